"""Validate real records against the JSON Schemas in ``schemas/`` (msgpack bin shown as base64)."""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import msgpack

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


@cache
def load_schema(name: str) -> dict[str, Any]:
    """A schema file by name, checked to be a valid Draft 2020-12 schema."""
    schema: dict[str, Any] = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def json_view(value: Any) -> Any:
    """msgpack data as JSON data: bytes become base64 strings."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): json_view(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_view(v) for v in value]
    return value


def validate_msgpack(raw: bytes, schema_name: str) -> dict[str, Any]:
    """Decode a msgpack record value and validate it; returns the decoded map."""
    decoded: dict[str, Any] = msgpack.unpackb(raw, raw=False)
    jsonschema.validate(json_view(decoded), load_schema(schema_name))
    return decoded


def validate_dlq_headers(headers: list[tuple[str, bytes]]) -> dict[str, str]:
    """Validate a DLQ record's headers; returns them as a map of strings."""
    shown = {k: v.decode("utf-8", "replace") for k, v in headers}
    jsonschema.validate(shown, load_schema("dlq-headers.schema.json"))
    return shown
