"""Apache Kafka in a container, through testcontainers: the Kafka image built from the Maven jars.

One KRaft node with two client listeners: ``PLAINTEXT`` on a random host port bound to 127.0.0.1 for
clients on the host, advertised as that port, and ``INTERNAL`` as ``kafka:19092`` for containers on the
same network (the worker image's tests). The host port is known only after the engine has mapped it, so
the container waits for its advertised listeners in a file that ``start`` writes, as testcontainers'
own KafkaContainer does with its start script.
"""

from __future__ import annotations

import shlex

from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network
from testcontainers.core.wait_strategies import LogMessageWaitStrategy

from worker.devtools.brokers import wait_for_port

CLIENT_PORT = 9092
INTERNAL_PORT = 19092
ALIAS = "kafka"
_ADVERTISED_FILE = "/tmp/advertised-listeners"
_STARTED = "Kafka Server started"


class KafkaBrokerContainer(DockerContainer):
    """A single KRaft node; ``bootstrap_servers`` for the host, ``internal_bootstrap`` for containers."""

    def __init__(self, image: str, network: Network, startup_timeout_s: int = 90) -> None:
        super().__init__(image)
        self.startup_timeout_s = startup_timeout_s
        # A random host port on loopback only (docker-py's (host_ip,) form of a port binding).
        self.ports[f"{CLIENT_PORT}/tcp"] = ("127.0.0.1",)  # type: ignore[assignment]  # docker-py accepts it
        self.network = network
        self.with_network(network).with_network_aliases(ALIAS)
        self.with_envs(
            KAFKA_LISTENERS=f"PLAINTEXT://:{CLIENT_PORT},CONTROLLER://:9093,INTERNAL://:{INTERNAL_PORT}",
            KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,INTERNAL:PLAINTEXT",
            KAFKA_INTER_BROKER_LISTENER_NAME="INTERNAL",
            KAFKA_ADVERTISED_LISTENERS_FILE=_ADVERTISED_FILE,
            KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS="4",
            KAFKA_GROUP_MIN_SESSION_TIMEOUT_MS="1000",
            KAFKA_MESSAGE_MAX_BYTES=str(64 * 1024 * 1024),
            KAFKA_REPLICA_FETCH_MAX_BYTES=str(64 * 1024 * 1024),
            KAFKA_AUTO_CREATE_TOPICS_ENABLE="false",
        )
        self.host_port = 0

    @property
    def bootstrap_servers(self) -> str:
        """``127.0.0.1:<mapped port>``, for clients on the host."""
        return f"127.0.0.1:{self.host_port}"

    @property
    def internal_bootstrap(self) -> str:
        """``kafka:19092``, for containers on the same network."""
        return f"{ALIAS}:{INTERNAL_PORT}"

    def start(self) -> KafkaBrokerContainer:
        """Start, tell the node its advertised listeners, wait until it serves clients on the host."""
        super().start()
        self.host_port = int(self.get_exposed_port(CLIENT_PORT))
        listeners = f"PLAINTEXT://127.0.0.1:{self.host_port},INTERNAL://{self.internal_bootstrap}"
        result = self.exec(["bash", "-c", f"echo {shlex.quote(listeners)} > {_ADVERTISED_FILE}"])
        if result.exit_code != 0:
            raise RuntimeError(f"could not write the advertised listeners: {result.output!r}")
        LogMessageWaitStrategy(_STARTED).with_startup_timeout(self.startup_timeout_s).wait_until_ready(self)
        wait_for_port("127.0.0.1", self.host_port, timeout_s=30)
        return self
