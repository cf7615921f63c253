"""What one request may carry, and how much the server holds at once: from the ``--serve-*`` settings."""

from __future__ import annotations

from dataclasses import dataclass

from worker.config import Settings


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits (each answered with a 4xx) and the queue bound (answered with a 429)."""

    max_request_bytes: int = 64 * 1024 * 1024
    max_inputs: int = 256
    max_text_chars: int = 16384
    max_image_bytes: int = 16 * 1024 * 1024
    max_queue: int = 1024
    retry_after_s: int = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> ServeLimits:
        """The limits the settings ask for; an image's bytes are capped as the worker's
        (``--max-message-bytes``)."""
        return cls(
            max_request_bytes=settings.serve_max_request_bytes,
            max_inputs=settings.serve_max_inputs,
            max_text_chars=settings.serve_max_text_chars,
            max_image_bytes=settings.max_message_bytes,
            max_queue=settings.serve_max_queue,
            retry_after_s=settings.serve_retry_after_s,
        )
