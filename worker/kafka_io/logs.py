"""The Kafka client's loggers, named here so that nothing outside the layer spells them."""

from __future__ import annotations

import logging

CLIENT_LOGGER = "kafka"
"""The root of the client's loggers (its lines repeat: worth a repeat limiter)."""

CLIENT_LOG_LEVELS = {
    # Every failed connection attempt is logged by the client; the layer says once per attempt what went
    # wrong (worker.kafka_io.factories.retry_until_deadline).
    "kafka.net": logging.WARNING,
    "kafka.conn": logging.CRITICAL,
}
"""Loggers of the client to hold at a level of their own, whatever the worker's level."""
