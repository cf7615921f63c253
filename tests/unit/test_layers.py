"""The seams hold: the rooms of the package stand in layers that import only downward, the runtime reaches
Kafka only through its layer, and only the delivery guarantees know which one runs."""

from __future__ import annotations

import ast
from pathlib import Path

import worker

PACKAGE = Path(worker.__file__).parent
KAFKA_LAYER = PACKAGE / "kafka_io"
DELIVERY = PACKAGE / "output" / "delivery"
TOOLING = PACKAGE / "devtools"
# The Kafka client libraries: kafka-python and confluent-kafka (librdkafka).
CLIENT_PACKAGES = {"kafka", "confluent_kafka"}
# The settings define the flag (and check it against --transactional-id); the delivery package reads it.
MODE_READERS = {PACKAGE / "config.py"}


def runtime_modules() -> list[Path]:
    return [path for path in PACKAGE.rglob("*.py") if TOOLING not in path.parents]


def test_the_tooling_lives_apart_from_the_runtime():
    assert TOOLING.is_dir()
    runtime = {path.stem for path in PACKAGE.glob("*.py")}
    assert not runtime & {"bench", "demo", "samples", "tiny_model", "brokers", "docs_table"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_only_the_kafka_layer_imports_the_kafka_clients():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            name for name in imported_modules(path) if name.split(".")[0] in CLIENT_PACKAGES
        )
        for path in runtime_modules()
        if KAFKA_LAYER not in path.parents
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_runtime_never_imports_the_tooling():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            n for n in imported_modules(path) if n.startswith("worker.devtools")
        )
        for path in runtime_modules()
        if path.name != "cli.py"  # the command line dispatches to the tooling's commands, lazily
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_no_delivery_mode_branch_outside_the_guarantees():
    offenders = []
    for path in runtime_modules():
        if (DELIVERY in path.parents and path not in MODE_READERS) or path in MODE_READERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "exactly_once":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_fetching_imports_nothing_of_the_worker_above_it():
    # Fetching reports to its own metrics interface and raises the worker's typed rejections; the stages
    # that use it sit above it.
    fetching = PACKAGE / "fetching"
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            name
            for name in imported_modules(path)
            if name.startswith("worker") and not name.startswith(("worker.fetching", "worker.errors"))
        )
        for path in fetching.glob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


# The clients' own words: kafka-python's options, its close() flag, its loggers; librdkafka's properties.
CLIENT_KEYWORDS = {
    "isolation_level",
    "auto_offset_reset",
    "enable_auto_commit",
    "autocommit",
    "api_version",
    "isolation.level",
    "auto.offset.reset",
    "enable.auto.commit",
    "bootstrap.servers",
    "group.id",
    "transactional.id",
    "partitioner",
}


def test_nothing_outside_the_kafka_layer_speaks_the_clients_dialect():
    offenders = []
    for path in runtime_modules():
        if KAFKA_LAYER in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg in CLIENT_KEYWORDS:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.arg}=")
            elif isinstance(node, ast.Constant) and _client_word(node.value):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert offenders == []


def _client_word(value: object) -> bool:
    return isinstance(value, str) and (value in CLIENT_KEYWORDS or value.split(".")[0] in CLIENT_PACKAGES)


# The rooms of worker/, lowest first: each imports only from its own room and those before it. One record
# goes up through them: kafka_io -> loop -> intake (fetching, imaging) -> inference -> output -> kafka_io.
LAYERS = (
    "errors",
    "fetching",
    "config",
    "messages",
    "kafka_io",
    "work",
    "ops",
    "imaging",
    "models",
    "intake",
    "output",
    "inference",
    "loop",
    "serving",
    "commands",
    "cli",
)


def test_nothing_imports_upward():
    rank = {room: index for index, room in enumerate(LAYERS)}
    offenders = []
    for path in runtime_modules():
        room = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if room == "__init__":
            continue
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] != "worker" or len(parts) < 2 or parts[1] == "devtools":
                continue  # the tooling: see test_the_runtime_never_imports_the_tooling
            if rank[parts[1]] > rank[room]:
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert offenders == []


def test_every_room_has_its_place_in_the_layers():
    rooms = {
        path.name.removesuffix(".py") for path in PACKAGE.iterdir() if path.suffix == ".py" or path.is_dir()
    }
    rooms -= {"__init__", "__pycache__", "devtools"}
    assert rooms == set(LAYERS)
