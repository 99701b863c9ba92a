# Two commands on a fresh machine:  `make demo`  and  `make test`.
# torch is installed first and pinned (constraints.txt) so that no pip call ever pulls a
# multi-GB CUDA build on a CPU machine. GPU users: install your torch build into the venv
# first (or set TORCH_SPEC), then `make install`.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
CONSTRAINTS := -c constraints.txt
TORCH_SPEC  ?= torch==2.13.0
DEMO_OUT    ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: venv install install-test demo test test-interop bench bench-quick clean-venv

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip $(CONSTRAINTS)
	$(PIP) install -q "$(TORCH_SPEC)" $(CONSTRAINTS)
	touch $@

venv: $(VENV)/.torch

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.torch pyproject.toml
	$(PIP) install -q $(CONSTRAINTS) -e ".[test,tensorboard,eval]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/text2llm run --out $(DEMO_OUT)

test: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(VENV)/bin/pytest tests

# llama.cpp itself: llama-cpp-python builds llama.cpp from source (about 13 minutes on 2 cores),
# too long for `make test`; then the parity test (llama.cpp's logits and greedy text == ours) and the
# llama.cpp row of the generation benchmark run instead of being skipped
test-interop: $(VENV)/.installed-test
	$(PIP) install $(CONSTRAINTS) llama-cpp-python
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(VENV)/bin/pytest tests/test_gguf.py -rs

bench: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_all.py

bench-quick: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_all.py --quick

clean-venv:
	rm -rf $(VENV)
