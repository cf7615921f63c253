"""Imaging: image bytes to model-ready pixels, on the host or on the model's device."""
