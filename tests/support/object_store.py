"""A real S3-compatible server for the by-reference tests: moto's standalone server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

# moto accepts any credentials; the fetcher still signs its requests with these, from the environment.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "test-access-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class ObjectStore:
    """The running server: its endpoint and a client to fill it."""

    endpoint_url: str
    client: Any
    buckets: set[str] = field(default_factory=set)  # made by put(): no listing per object

    def put(self, bucket: str, key: str, data: bytes) -> str:
        """Store ``data`` (creating the bucket if needed); returns its ``s3://`` URI."""
        if bucket not in self.buckets:
            self.client.create_bucket(Bucket=bucket)
            self.buckets.add(bucket)
        self.client.put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3://{bucket}/{key}"


@contextmanager
def object_store() -> Iterator[ObjectStore]:
    """Start moto's S3 server on a free loopback port for the duration of the block."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_ENV["AWS_DEFAULT_REGION"],
        )
        yield ObjectStore(endpoint, client)
    finally:
        server.stop()
