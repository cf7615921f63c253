"""Model families behind one interface: the family is chosen from the checkpoint's own ``model_type``."""

from worker.models.base import BuiltinCheckpoint, LoadedModel, ModelFamily
from worker.models.checkpoint import RANDOM_PREFIX, ModelSpec
from worker.models.select import FAMILIES, family_of_model, select_family

__all__ = [
    "FAMILIES",
    "RANDOM_PREFIX",
    "BuiltinCheckpoint",
    "LoadedModel",
    "ModelFamily",
    "ModelSpec",
    "family_of_model",
    "select_family",
]
