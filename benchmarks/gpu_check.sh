#!/usr/bin/env bash
# Band's cost on a GPU: one prepared script for the `device` machine (no network there), at most 8 minutes.
#
#   1. installs the carried wheels from .whl/ (git-ignored) into /tmp/site: trl and datasets, and what the device
#      image lacks or has in another version (its image has torch, accelerate, tokenizers, safetensors,
#      huggingface-hub, psutil, but transformers 5.17 where this project needs >= 5.24);
#   2. benchmarks.bench_step on a random-init model with Qwen2.5-0.5B's shapes (494M parameters, 151,936-token
#      vocabulary) in bf16 on cuda: GRPOTrainer (canonical clip 0.2) and BandGRPOTrainer (Band KL, delta 0.05),
#      identical configuration, 20 optimizer steps per run, 2 repetitions in alternating order (A B, B A):
#      step-time ratio and peak GPU memory (torch.cuda.max_memory_allocated);
#   3. benchmarks.bench_band --device cuda: the Band operator against the canonical surrogate and against the
#      authors' style of bisection.
#
# Prepare the wheels on the development machine, from the repository root (Python 3.12 on the device):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl trl==1.16.0 datasets==5.2.0 transformers==5.24.0 dill==0.4.1 \
#       multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0 regex==2026.11.19 math-verify==0.9.0 \
#       latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
#
# (17 MiB; `/.whl/` is in .gitignore). pyarrow (datasets needs >= 24) is left out on purpose: its wheel is 55 MiB
# and the working tree plus carried paths may not exceed 64 MiB; the image ships a pyarrow, and the script stops
# at once with a clear message if it is too old (then carry `pyarrow==26.0.1` alone, e.g. without transformers,
# which the image also has, at 5.17). Then, with the device tool:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Figures are printed, and saved as four files under $OUT (the device tool brings that folder back; elsewhere
# outputs/gpu_check); the runs' own files stay in outputs/gpu_check/bench_step.
# A dry run of the same steps on this CPU machine (tiny model, no wheels, a few minutes):
#
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT_DIR=${OUT:-outputs/gpu_check}
WORK_DIR=outputs/gpu_check
mkdir -p "$OUT_DIR" "$WORK_DIR"
status=0
start=$(date +%s)

if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then
    PY=${PY:-.venv/bin/python}
    DEVICE=cpu
    STEP_ARGS=(--model tiny --reps 1 --steps 8 --skip 2 --batch 16 --completion-length 16 --profile-steps 0)
    BAND_ARGS=(--tokens 100000 --repeats 3)
else
    PY=${PY:-python3}
    DEVICE=cuda
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
fi
# The package itself travels as source: import it from src/.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

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

echo "== bench_step: GRPOTrainer vs BandGRPOTrainer (band kl), $DEVICE"
timeout 390 "$PY" -m benchmarks.bench_step --device "$DEVICE" "${STEP_ARGS[@]}" --output-dir "$WORK_DIR/bench_step" \
    2>&1 | tee "$OUT_DIR/bench_step.txt" || status=1
cp "$WORK_DIR/bench_step/summary.json" "$OUT_DIR/bench_step_summary.json" 2>/dev/null || status=1

echo "== bench_band: the Band operator, $DEVICE"
timeout 90 "$PY" -m benchmarks.bench_band --device "$DEVICE" "${BAND_ARGS[@]}" 2>&1 | tee "$OUT_DIR/bench_band.txt" || status=1

echo "gpu_check done in $(($(date +%s) - start)) s, status $status"
exit $status
