"""Operator commands beside the worker: produce and tail, query, fleet."""
