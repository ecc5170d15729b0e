"""odmoe: OD-MoE (arXiv 2512.03927) on torch.distributed, its baselines, and the experiments of the paper."""

from odmoe.errors import OdmoeError

__all__ = ["OdmoeError"]
__version__ = "0.1.0"
