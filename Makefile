# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch==2.13.0 is installed first, alone: it is a CPU build that pip finds on this kind of machine
# (and on PyPI elsewhere); the project's range `torch>=2.4` is then already met and pulls no CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: install demo test bench bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/spa-vl demo demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_dataset.py
	$(BIN)/python bench/bench_validate.py
	$(BIN)/python bench/bench_import.py
	$(BIN)/python bench/bench_generate.py

# On a GPU machine only: DPO on a LLaVA-1.5-7B-shaped model (random weights), ours vs plain trl.
bench-gpu: $(STAMP)
	$(BIN)/python bench/bench_gpu.py

clean:
	rm -rf demo_out bench_out .pytest_cache
