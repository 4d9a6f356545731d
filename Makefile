# The two commands a newcomer runs on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.raydino-installed

.PHONY: demo test test-fast bench install rehearse gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/raydino pretrain

test: $(STAMP)
	$(BIN)/ruff check raydino sweeps tests benchmarks
	$(BIN)/python -m pytest -q --durations=15

# the iteration tier: everything but the multi-minute Ray end-to-end and fault tests (marker "slow")
test-fast: $(STAMP)
	$(BIN)/ruff check raydino sweeps tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/vmf_overhead.py

# cluster.yaml's node types on Ray's fake multi-node autoscaler, a sweep submitted as a job (docs/scale-out.md)
rehearse: $(STAMP)
	$(BIN)/python -m raydino.commands.rehearsal cluster.yaml --workdir rehearsal

# every GPU-only path once, with a report (gpu_check/report.md, report.json); without CUDA a reduced CPU version
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out gpu_check
