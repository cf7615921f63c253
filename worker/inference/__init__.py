"""Inference: the stage on its own thread, the family's model, and the score heads."""
