"""Re-implementation of Mixtral-Offloading (Eliseev & Mazur, arXiv 2312.17238; ``dvmazur/mixtral-offloading``;
BASELINES.md §2.1).

What the original does, and where it is here:

* **Per-layer LRU expert cache** (paper: LRU caching; ``src/expert_cache.py``: one eviction group per layer,
  ``offload_per_layer`` of the E experts off the GPU): ``experts_per_layer`` = k_c resident experts per layer,
  LRU within the layer. Default 4 of 8, the demo notebook's ``offload_per_layer = 4`` (the 16 GB setting;
  consistent with the 11 GB OD-MoE measured).
* **Speculative expert loading** (paper: speculative expert loading; absent from the public code): layer l+1's
  gate applied to layer l's hidden state, its top-``prefetch`` experts (default 2) loaded into layer l+1's
  cache while layer l computes (decode).
* **HQQ mixed quantization** (paper: mixed MoE quantization; ``notebooks/demo.ipynb``): experts HQQ 2-bit,
  group 16, with 8-bit quantized scales and zeros (``quantize: hqq2``; ``hqq3`` = the paper's 3-bit experts;
  ``none`` = fp32, lossless); attention projections HQQ 4-bit, group 64 (``attention: hqq4``; ``none`` keeps
  them fp32). Through the ``hqq`` package (``baselines/lowbit.py``). The host holds the packed experts, the
  link moves the packed bytes, and each use dequantizes them inside the timed expert computation (the
  original's Triton kernels dequantize inside the matmul).
* **Eviction** by discard (default, ``writeback: false``); ``writeback: true`` reproduces the public code's
  ``_swap``, which copies the evicted expert back over the same link before each load.

Deviations: dequantize-then-fp32-matmul in PyTorch instead of fused Triton kernels (no GPU kernel on the CPU
testbed); the router, embeddings and norms stay fp32 where the original keeps them fp16 (the embedded model is
fp32).
"""

from __future__ import annotations

from baselines.cache import LRU
from baselines.engine import Policy, full_plan
from baselines.lowbit import quantize_attention, restore_attention
from baselines.predict import StackedGates
from odmoe.errors import OdmoeError

QUANTIZE = {"hqq2": "hqq2", "hqq3": "hqq3", "nf4": "nf4", "none": "fp32"}


class HQQAttention:
    """Mixtral-Offloading's 4-bit HQQ attention (``attention: hqq4``), swapped into the shared model while
    the engine lives (AdapMoE, built on the same code, uses it too)."""

    attention = "none"
    _swapped: tuple = ()

    def install(self, engine):
        if self.attention != "none":
            self._swapped = quantize_attention(engine.model, self.attention)

    def uninstall(self, engine):
        restore_attention(self._swapped)
        self._swapped = []


class MixtralOffloading(HQQAttention, Policy):
    name = "mixtral_offloading"

    def __init__(
        self,
        experts_per_layer: int = 4,
        quantize: str = "hqq2",
        prefetch: int = 2,
        writeback: bool = False,
        attention: str = "hqq4",
    ):
        if quantize not in QUANTIZE:
            raise OdmoeError(
                f"mixtral_offloading.quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}"
            )
        if attention not in ("hqq4", "none"):
            raise OdmoeError(f"mixtral_offloading.attention must be hqq4 or none, got {attention!r}")
        self.experts_per_layer = int(experts_per_layer)
        self.fmt = QUANTIZE[quantize]
        self.attention = attention
        self.num_prefetch = int(prefetch)
        self.writeback = bool(writeback)
        self.gates = None

    @property
    def lossy(self) -> bool:
        return self.fmt != "fp32" or self.attention != "none"

    def capacity(self, engine):
        size = self.experts_per_layer * engine.fmt_bytes[self.fmt]
        return {layer: size for layer in engine.layers}, lambda key: key[0]

    def make_eviction(self):
        return LRU()

    def plan(self, engine, layer, hidden, idx, w):
        return full_plan(idx, self.fmt), w

    def prefetch(self, engine, layer, hidden, idx, w):
        if self.num_prefetch <= 0 or hidden.shape[0] != 1:
            return
        if self.gates is None:
            self.gates = StackedGates(engine.adapter, 1)
        for target, _, experts in self.gates.predict(layer, hidden, self.num_prefetch):
            engine.prefetch([(target, int(e), self.fmt) for e in experts[0]])


def build(cfg: dict, lm, hardware) -> MixtralOffloading:
    return MixtralOffloading(
        cfg.get("experts_per_layer", 4),
        cfg.get("quantize", "hqq2"),
        cfg.get("prefetch", 2),
        cfg.get("writeback", False),
        cfg.get("attention", "hqq4"),
    )
