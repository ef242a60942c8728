# Every target installs what it needs first, so a fresh clone needs only Python 3.11+ and make.
PY ?= python3
UV := $(PY) -m uv

.PHONY: setup demo test test-fast lint format bench gpu-check-dry clean

# Debian's chromium drives the Prefect UI test; without root or apt it warns and that test skips.
setup:
	@$(PY) -m uv --version >/dev/null 2>&1 || $(PY) -m pip install --quiet uv
	$(UV) sync --frozen --extra dev
	@[ -x "$${FGID_CHROMIUM:-/usr/bin/chromium}" ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  echo "warning: no chromium (needs root and apt-get); tests/flows/test_ui.py will skip"

# A real build of real photos (from installed packages) with the lite models on a local Prefect server.
demo: setup
	$(UV) run fgid samples data/samples
	$(UV) run fgid build data/samples --out data/fgid-demo --models lite --shard-size 4
	$(UV) run fgid inspect data/fgid-demo

# Everything CI runs: the GPU check's steps on the CPU at toy sizes (so the one command a GPU
# session runs works), then unit, slow (Prefect server, real kills) and, on a GPU, gpu tests.
test: setup
	bash bench/gpu_check.sh --dry-run
	$(UV) run pytest

test-fast: setup
	$(UV) run pytest -m "not slow and not gpu"

lint: setup
	$(UV) run ruff check . && $(UV) run ruff format --check .

format: setup
	$(UV) run ruff format . && $(UV) run ruff check --fix .

bench: setup
	$(UV) run python bench/build_bench.py

# The GPU check's steps on the CPU at toy sizes (the GPU run itself: bench/gpu_check.sh on a GPU
# machine, after bench/prepare_gpu_check.sh); figures and log in bench-out/gpu-check/.
gpu-check-dry: setup
	bash bench/gpu_check.sh --dry-run

clean:
	rm -rf data/fgid-demo data/samples .pytest_cache
