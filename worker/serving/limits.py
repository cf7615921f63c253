"""What one request may carry, and how much the server holds at once: from the ``--serve-*`` settings."""

from __future__ import annotations

from dataclasses import dataclass

from worker.config import Settings


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits (each answered with a 4xx) and the Retry-After of a 429; the queue's own bounds
    are the engine's."""

    max_request_bytes: int
    max_inputs: int
    max_text_chars: int
    max_image_bytes: int
    retry_after_s: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ServeLimits:
        """The limits the settings ask for; an image's bytes are capped as the worker's
        (``--max-message-bytes``)."""
        return cls(
            max_request_bytes=settings.serve_max_request_bytes,
            max_inputs=settings.serve_max_inputs,
            max_text_chars=settings.serve_max_text_chars,
            max_image_bytes=settings.max_message_bytes,
            retry_after_s=settings.serve_retry_after_s,
        )
