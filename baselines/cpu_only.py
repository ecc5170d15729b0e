"""CPU-only, llama.cpp-style: every weight in host DRAM, every layer computed on the host CPU, no device
(re-implementation of OD-MoE's llama.cpp baseline, BASELINES.md §2.7, as a PyTorch CPU executor, fp32).

Its time is the host's: under ``timing=measured`` the real CPU time of computing the whole model on this
CPU (unscaled: the host *is* this CPU, while emulated devices take the profile's ``compute_scale``); under
``timing=modelled`` the cost model priced on the profile's ``host`` device (its DRAM bandwidth and FLOP/s,
e.g. the paper's EPYC 7K62 baseline server); under ``timing=wall`` on a GPU machine the model really runs on
the CPU. There is no fixed slowdown factor. Device memory is 0.

Deviation from the original: llama.cpp's hand-written CPU kernels (ggml, GGUF weights, its own threading)
are not reproduced; PyTorch's CPU kernels compute the same fp32 model.
"""

from __future__ import annotations

from baselines.engine import Policy


class CpuOnly(Policy):
    name = "cpu_only"
    offload = False
    on_device = False


def build(cfg: dict, lm, hardware) -> CpuOnly:
    return CpuOnly()
