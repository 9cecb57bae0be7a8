# `make demo` and `make test` create .venv when missing and install sdlora into it.
# torch is taken from the machine (TORCH names the wheel pip should find); nothing else
# pulls a CUDA build.

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,ui]"
	touch $(STAMP)

# One thread unless set: the micro model's tensors are too small to gain from more, and on a
# busy CPU the extra threads wait on each other (measured: 5.3 vs 1.2 steps/s).
demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/sdlora demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The suite trains tiny models: one thread each, for the same reason as the demo, and two
# test processes (TEST_JOBS) share the cores; a test module stays on one process (its shared
# fixtures, the studio's one app per module). Measured: 11 min 18 s in one process, 5 min 45 s
# in two on a 2-core machine.
TEST_JOBS ?= 2
test: lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q --durations=15 \
		-n $(TEST_JOBS) --dist loadfile

clean:
	rm -rf $(VENV) runs
