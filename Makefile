# sala-train: the two commands of the README, each sets up its own environment in .venv.
#   make demo   tiny teacher -> selection -> conversion -> all stages -> export -> generation -> evaluation (CPU)
#   make test   the CPU test suite (GPU tests are skipped without a GPU)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# PYTHONSAFEPATH=1: the checkout's top-level kernels/ must not shadow the PyPI package `kernels`, which
# transformers (5.25 and newer) imports; python -m would put the checkout first on sys.path.
# CPU torch wheel first (unpinned, pip would pull several GB of CUDA wheels), triton paired with it.
TORCH_PINS := torch==2.13.0 triton==3.7.1
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test,wandb,deepspeed,megatron]'
	touch $@

demo: venv
	PYTHONSAFEPATH=1 $(PY) -m sala_train.demo $(DEMO_DIR)

test: venv
	PYTHONSAFEPATH=1 $(PY) -m pytest -q -m "not gpu and not multi_gpu" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build dist *.egg-info
