"""Model layer: the MoE adapter, offline loading, and the embedded models."""

from odmoe.models.adapter import MoEAdapter
from odmoe.models.load import LoadedModel, load_from_cfg, load_model

__all__ = ["LoadedModel", "MoEAdapter", "load_from_cfg", "load_model"]
