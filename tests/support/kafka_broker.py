"""A single-node Apache Kafka (KRaft) for the integration tests, run from its Maven Central jars.

The jars are resolved once with Maven (``.ci/kafka/pom.xml``) into a cache outside the clone
(``$KAFKA_JARS_DIR``, default ``~/.cache/clip-worker/kafka-<version>-<pom digest>``: a changed pom
resolves afresh). The broker binds 127.0.0.1 on
free ports and keeps its log directory in a temporary folder, so it can be restarted with its data.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.tls import TlsFiles
from worker.devtools.brokers import free_port, stop_process, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
POM = ROOT / ".ci" / "kafka" / "pom.xml"
CLUSTER_ID = "Y2xpcC13b3JrZXItdGVzdA"  # 22 base64url characters, any value works for a fresh log dir


def kafka_version() -> str:
    """The Apache Kafka version pinned in the pom."""
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text())
    assert match, "kafka.version missing from .ci/kafka/pom.xml"
    return match.group(1)


def jars_dir() -> Path:
    """Where the broker's jars are cached."""
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:8]
    default = Path.home() / ".cache" / "clip-worker" / f"kafka-{kafka_version()}-{digest}"
    return Path(os.environ.get("KAFKA_JARS_DIR", default))


def ensure_jars() -> Path:
    """Resolve the broker jars with Maven unless they are cached already."""
    target = jars_dir()
    marker = target / ".complete"
    if marker.exists():
        return target
    if shutil.which("mvn") is None:
        raise RuntimeError("Maven (mvn) is needed to fetch the Apache Kafka jars for the integration tests")
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={target}",
        ],
        check=True,
    )
    marker.touch()
    return target


@dataclass(frozen=True)
class SecureListener:
    """A SASL_SSL listener with one SCRAM-SHA-256 user, beside the PLAINTEXT one."""

    tls: TlsFiles
    username: str
    password: str

    def scram_credential(self) -> str:
        """The StorageTool argument that creates the user at format time."""
        return f"SCRAM-SHA-256=[name={self.username},password={self.password}]"

    def properties(self, port: int, controller_port: int, secure_port: int) -> dict[str, str]:
        """Broker properties of both listeners."""
        return {
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port},"
            f"SASL_SSL://127.0.0.1:{secure_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{secure_port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL",
            "sasl.enabled.mechanisms": "SCRAM-SHA-256",
            "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(self.tls.keystore),
            "ssl.keystore.password": self.tls.keystore_password,
            "ssl.key.password": self.tls.keystore_password,
        }


class ApacheKafka:
    """One KRaft node (broker + controller) on loopback."""

    def __init__(
        self, workdir: Path, extra: dict[str, str] | None = None, secure: SecureListener | None = None
    ):
        self.workdir = workdir
        self.port = free_port()
        self.controller_port = free_port()
        self.extra = extra or {}
        self.secure = secure
        self.secure_port = free_port() if secure else 0
        self._process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "broker.log"
        self._formatted = False

    @property
    def bootstrap_servers(self) -> str:
        """``127.0.0.1:port`` of the client listener."""
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.workdir / "data"),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "group.min.session.timeout.ms": "1000",
            "message.max.bytes": str(64 * 1024 * 1024),
            "replica.fetch.max.bytes": str(64 * 1024 * 1024),
            "auto.create.topics.enable": "false",  # as on most production clusters
            **self.extra,
        }
        if self.secure is not None:
            props.update(self.secure.properties(self.port, self.controller_port, self.secure_port))
        path = self.workdir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        log4j = self.workdir / "log4j2.properties"
        log4j.write_text(
            "rootLogger.level=WARN\nrootLogger.appenderRef.out.ref=OUT\nappender.out.type=Console\n"
            "appender.out.name=OUT\nappender.out.layout.type=PatternLayout\n"
            "appender.out.layout.pattern=[%d] %p %m (%c)%n\n"
        )
        return path

    def _java(self, *args: str) -> list[str]:
        return [
            "java",
            "-Xms256m",
            "-Xmx768m",
            "-XX:+UseSerialGC",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            "-cp",
            f"{ensure_jars()}/*",
            *args,
        ]

    def start(self, timeout_s: float = 60.0) -> ApacheKafka:
        """Format the log dir (first start only), start the node, wait for the client port."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        if not self._formatted:
            scram = ["--add-scram", self.secure.scram_credential()] if self.secure else []
            subprocess.run(
                self._java("kafka.tools.StorageTool", "format", "-t", CLUSTER_ID, "-c", str(config), *scram),
                check=True,
                capture_output=True,
            )
            self._formatted = True
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._java("kafka.Kafka", str(config)), stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_for_port("127.0.0.1", self.port, timeout_s, self._process)
        except Exception as exc:
            raise RuntimeError(f"{exc}; broker log:\n{self.log_path.read_text()[-4000:]}") from None
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop the node (SIGKILL when ``kill``); the log directory is kept for a restart."""
        if self._process is None:
            return
        stop_process(self._process, timeout_s=30, kill=kill)
        self._process = None

    def restart(self, downtime_s: float = 0.0) -> None:
        """Stop, wait, start again on the same ports with the same data."""
        self.stop()
        time.sleep(downtime_s)
        self.start()
