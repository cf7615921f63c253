"""A throwaway CA and a broker certificate for 127.0.0.1 (openssl), and the PKCS#12 keystore Kafka reads."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

KEYSTORE_PASSWORD = "keystore-pass"


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the generated files."""

    ca_cert: Path
    keystore: Path
    keystore_password: str = KEYSTORE_PASSWORD


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_tls(directory: Path) -> TlsFiles:
    """Create ``ca.pem`` and ``broker.p12`` (key + certificate for CN=localhost, IP 127.0.0.1)."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=clip-worker-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=directory,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "broker.key",
        "-out",
        "broker.csr",
        cwd=directory,
    )
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "broker.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
        "-out",
        "broker.pem",
        cwd=directory,
    )
    _openssl(
        "pkcs12",
        "-export",
        "-in",
        "broker.pem",
        "-inkey",
        "broker.key",
        "-certfile",
        "ca.pem",
        "-name",
        "broker",
        "-passout",
        f"pass:{KEYSTORE_PASSWORD}",
        "-out",
        "broker.p12",
        cwd=directory,
    )
    return TlsFiles(directory / "ca.pem", directory / "broker.p12")
