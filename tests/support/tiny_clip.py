"""Re-export of the tiny checkpoint builder for tests."""

from worker.devtools.tiny_model import TINY_DIM, TINY_IMAGE_SIZE, build_tiny_clip

__all__ = ["TINY_DIM", "TINY_IMAGE_SIZE", "build_tiny_clip"]
