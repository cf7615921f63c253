"""clip-worker: a Kafka worker that embeds images and texts with CLIP-family models (OpenAI CLIP
ViT-L/14 by default)."""

__version__ = "0.1.0"
