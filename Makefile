# Two commands do all the set-up on a fresh machine:
#   make demo   — install into .venv (once), then run the main job offline on the embedded corpus
#   make test   — install into .venv (once), then run the test suite
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed
UV = $(VENV)/bin/uv pip install -q --python $(VENV)/bin/python --compile-bytecode

.PHONY: demo test install bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, from the pinned CPU wheel: a looser resolution pulls a multi-GB CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0
	# The rest through uv: the same pins, resolved and installed in parallel (about 30 s here against
	# pip's 2+ minutes). uv keeps the torch above: pyproject.toml pins that release. Where uv cannot
	# reach the index as pip does (pip's own configuration, a proxy's certificate), pip installs it.
	$(VENV)/bin/pip install -q uv==0.13.9 || true
	$(UV) -e '.[dev]' || $(VENV)/bin/pip install -q -e '.[dev]'
	# OLMo-core for the export tests, without the pins that would downgrade huggingface-hub (pyproject.toml)
	$(UV) --no-deps ai2-olmo-core==3.0.0 cached-path==1.8.10 || \
		$(VENV)/bin/pip install -q --no-deps ai2-olmo-core==3.0.0 cached-path==1.8.10
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tokenmill demo --run-dir runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=15

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_tokenize_pack.py
