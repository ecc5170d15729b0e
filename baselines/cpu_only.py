"""CPU-only, llama.cpp-style: every expert computed from host memory on the CPU, no device at all
(re-implementation of OD-MoE's llama.cpp baseline, BASELINES.md §2.7, as a PyTorch CPU executor, fp32).

On a CUDA machine the model runs on the CPU for real. On the emulated CPU device the "device" *is* the
CPU, so CPU-only would time exactly like fully cached; ``host_slowdown`` (default 4.57 = RTX 3090's
936.2 GB/s over the EPYC 7K62's 204.8 GB/s peak DRAM bandwidth, the paper's two machines; batch-1
decode is memory-bound) scales the measured compute so the emulated host is slower than the emulated
device by the paper's hardware ratio. Device memory is 0.
"""

from __future__ import annotations

from baselines.engine import Policy

DEFAULT_HOST_SLOWDOWN = 936.2 / 204.8


class CpuOnly(Policy):
    name = "cpu_only"
    offload = False
    on_device = False

    def __init__(self, host_slowdown: float = 1.0):
        self.host_slowdown = float(host_slowdown)


def build(cfg: dict, lm, hardware) -> CpuOnly:
    slowdown = cfg.get("host_slowdown")
    if slowdown is None:
        slowdown = DEFAULT_HOST_SLOWDOWN if next(lm.model.parameters()).device.type != "cuda" else 1.0
    return CpuOnly(slowdown)
