"""Intake: a request record to model-ready work or a typed rejection, in record order (one handler
per input kind), and the batcher."""
