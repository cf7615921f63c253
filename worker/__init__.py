"""clip-worker: a Kafka worker that embeds images with OpenAI CLIP ViT-L/14."""

__version__ = "0.1.0"
