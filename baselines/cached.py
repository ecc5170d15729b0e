"""Fully cached: HF Transformers with every expert resident on the device — the upper bound
(re-implementation of OD-MoE's "Transformers" baseline, BASELINES.md §2.8, on one device).

Every expert is loaded before the run (no link traffic); device memory is all weights + KV cache, on
``devices`` pooled devices (the paper's Transformers row needs all 8 GPUs of its server for fp32 Mixtral).
"""

from __future__ import annotations

from baselines.engine import Policy


class FullyCached(Policy):
    name = "cached"
    offload = False

    def __init__(self, devices: int = 8):
        self.devices = int(devices)


def build(cfg: dict, lm, hardware) -> FullyCached:
    return FullyCached(cfg.get("devices", 8))
