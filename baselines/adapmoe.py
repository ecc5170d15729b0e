"""Re-implementation of AdapMoE (Zhong et al., ICCAD'24, arXiv 2408.10284; ``PKU-SEC-Lab/AdapMoE``;
BASELINES.md §2.4). AdapMoE is built on Mixtral-Offloading's code (HQQ experts, per-layer caches).

What the original does, and where it is here:

* **Sensitivity-based adaptive gating** (paper: adaptive sensitivity-based expert gating;
  ``benchmarks/run_acc_benchmark.py``, ``run.py``): during decode (as ``src/custom_layers.py``), a token's
  second expert is dropped at layer l when its weight w2 < tau_l = sqrt(budget / S_l) (the code's
  ``math.sqrt(threshold / weight[idx])``), the kept weight renormalized to 1 (top-1 fallback,
  ``src/custom_layers.py``). S_l is the layer's sensitivity: the second-order (Fisher) estimate of the loss
  increase per unit w2², measured on calibration-split text (``baselines.calibrate.moe_sensitivity`` gives the
  derivation). ``sensitivity_budget`` (default 0.005, ``run.py``'s threshold) is the largest predicted loss
  increase, in nats, one drop may cost. The share of dropped experts is an outcome (``skipped_share``), never
  tuned. ``sensitivity_budget: 0`` turns gating off.
* **Adaptive prefetch** (paper: adaptive expert prefetching; ``SparseMoeWrapper.forward``): during decode, the
  gates of layers l+1, l+2, ... (up to ``prefetch_depth``) are applied to layer l's state, top-2 each, nearest
  layer first; the first predicted expert not already cached is prefetched — one per layer, as the code's
  ``experts.check`` loop. The public code's loop over layers ahead stops at l+1 (``range(1, 2)``); depth 3
  (our choice) lets it reach further when the next layers' predictions are resident.
* **DP cache allocation across layers** (paper: dynamic cache allocation; ``src/dp.py``): per-layer LRU cache
  sizes s_l minimizing sum_l f_l(s_l) with sum_l s_l = the budget, f_l(s) the expected demand loads per token
  of ``dp.py``'s ``f`` (uniform expert use, one prefetch of accuracy acc_l, a share top1_l of tokens using one
  expert), generalized from 8 experts to E. acc_l and top1_l are measured on the calibration set (``dp.py``
  hard-codes Mixtral's).
* **HQQ** as ``run.py`` configures it: experts 2-bit, group 16 (``quantize: hqq2``; ``none`` = fp32),
  attention 4-bit, group 64 (``attention: hqq4``; ``none`` = fp32); ``baselines/lowbit.py``.
* Budget ``cache_fraction`` of all experts (default 0.44: (8 GB - about 1.6 GB of 4/16-bit non-expert weights)
  / 57 MB 2-bit experts = 112 of 256).

Deviations: the calibration scripts are unreleased, so S_l is computed with our Fisher derivation (its units
may differ from the published weights, so the same budget need not drop the same share);
dequantize-then-matmul in PyTorch instead of Triton kernels (no GPU kernel on the CPU testbed).
"""

from __future__ import annotations

import numpy as np
import torch

from baselines.cache import LRU
from baselines.calibrate import moe_sensitivity
from baselines.engine import Policy, full_plan
from baselines.mixtral_offloading import HQQAttention
from baselines.predict import StackedGates
from odmoe.errors import OdmoeError

QUANTIZE = {"hqq2": "hqq2", "hqq3": "hqq3", "nf4": "nf4", "none": "fp32"}


def adaptive_keep(weights: torch.Tensor, tau: float) -> torch.Tensor:
    """[T, k] bool: the first expert always, later ones when their weight >= tau."""
    keep = weights >= tau
    keep[:, 0] = True
    return keep


def thresholds(sensitivity: np.ndarray, budget: float) -> np.ndarray:
    """Per-layer tau_l = sqrt(budget / S_l): a drop is allowed when w2² S_l < budget."""
    return np.sqrt(budget / np.maximum(sensitivity, 1e-30))


def expected_loads(acc: float, top1: float, size: int, num_experts: int) -> float:
    """``src/dp.py``'s ``f``: expected demand loads per token of a layer with ``size`` of E experts cached,
    a one-expert prefetch of accuracy ``acc`` and a share ``top1`` of single-expert tokens."""
    E, s = num_experts, min(size, num_experts)
    both_missing = (E - s) * (E - s - 1) / (E * (E - 1))
    one_missing = 2 * s * (E - s) / (E * (E - 1))
    single = (1 - s / E) * (1 - acc)
    pair = 2 * both_missing * (1 - acc) + both_missing * acc + one_missing * (1 - acc)
    return top1 * single + (1 - top1) * pair


def dp_cache_sizes(cost: np.ndarray, budget: int) -> list[int]:
    """Sizes s_l (1..E) with sum = budget minimizing sum_l cost[l, s_l - 1] (cost: [L, E])."""
    L, E = cost.shape
    budget = int(min(max(budget, L), L * E))
    inf = float("inf")
    best = np.full((L + 1, budget + 1), inf)
    choice = np.zeros((L + 1, budget + 1), dtype=int)
    best[0, 0] = 0.0
    for layer in range(1, L + 1):
        for b in range(budget + 1):
            for s in range(1, min(E, b) + 1):
                v = best[layer - 1, b - s] + cost[layer - 1, s - 1]
                if v < best[layer, b]:
                    best[layer, b], choice[layer, b] = v, s
    sizes, b = [], budget
    for layer in range(L, 0, -1):
        sizes.append(int(choice[layer, b]))
        b -= choice[layer, b]
    return sizes[::-1]


class AdapMoE(HQQAttention, Policy):
    name = "adapmoe"

    def __init__(
        self,
        sizes: list[int],
        taus: list[float],
        quantize: str = "hqq2",
        prefetch: bool = True,
        prefetch_depth: int = 3,
        attention: str = "hqq4",
        calibration: dict | None = None,
    ):
        if quantize not in QUANTIZE:
            raise OdmoeError(f"adapmoe.quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
        if attention not in ("hqq4", "none"):
            raise OdmoeError(f"adapmoe.attention must be hqq4 or none, got {attention!r}")
        self.sizes = list(sizes)
        self.taus = [float(t) for t in taus]
        self.fmt = QUANTIZE[quantize]
        self.do_prefetch = bool(prefetch)
        self.depth = int(prefetch_depth)
        self.attention = attention
        self.gates = None
        self.calibration = calibration  # what the thresholds and sizes were derived from (report)

    @property
    def lossy(self) -> bool:
        return self.fmt != "fp32" or self.attention != "none" or any(t > 0 for t in self.taus)

    def capacity(self, engine):
        return {
            layer: s * engine.fmt_bytes[self.fmt] for layer, s in zip(engine.layers, self.sizes, strict=True)
        }, lambda k: k[0]

    def make_eviction(self):
        return LRU()

    def plan(self, engine, layer, hidden, idx, w):
        tau = self.taus[engine.layers.index(layer)]
        if tau <= 0 or idx.shape[1] < 2 or idx.shape[0] != 1:  # decode only, as src/custom_layers.py
            return full_plan(idx, self.fmt), w
        keep = adaptive_keep(w, tau)
        w = w * keep
        w = w / w.sum(dim=-1, keepdim=True)
        return full_plan(idx, self.fmt, keep), w

    def report(self) -> dict:
        cal = self.calibration
        if cal is None:
            return {}
        taus = ", ".join(f"{t:.2f}" for t in self.taus)
        return {
            "calib_size": cal["calib_tokens"],
            "calibration": f"sensitivity on {cal['calib_tokens']} calib-split tokens; tau_l = [{taus}]; "
            f"DP sizes {self.sizes}",
        }

    def prefetch(self, engine, layer, hidden, idx, w):
        if not self.do_prefetch or self.depth <= 0 or hidden.shape[0] != 1:
            return
        if self.gates is None:
            self.gates = StackedGates(engine.adapter, self.depth)
        for target, _, experts in self.gates.predict(layer, hidden, engine.adapter.top_k):
            for e in experts[0].tolist():
                if (target, e, self.fmt) not in engine.cache:
                    engine.prefetch([(target, e, self.fmt)])
                    return


def build(cfg: dict, lm, hardware) -> AdapMoE:
    adapter = lm.adapter
    L, E = adapter.num_moe_layers, adapter.num_experts
    budget = float(cfg.get("sensitivity_budget", 0.005))
    sens = moe_sensitivity(lm, int(cfg.get("calib_sequences", 8)), int(cfg.get("calib_len", 128)))
    taus = thresholds(sens.sensitivity, budget) if budget > 0 else np.zeros(L)
    top1 = (sens.second_weights < taus[None, :]).mean(axis=0)
    cost = np.array(
        [
            [expected_loads(sens.prefetch_accuracy[s], top1[s], size, E) for size in range(1, E + 1)]
            for s in range(L)
        ]
    )
    slots = max(L, round(float(cfg.get("cache_fraction", 0.44)) * L * E))
    sizes = dp_cache_sizes(cost, slots)
    return AdapMoE(
        sizes,
        list(taus),
        cfg.get("quantize", "hqq2"),
        cfg.get("prefetch", True),
        cfg.get("prefetch_depth", 3),
        cfg.get("attention", "hqq4"),
        calibration={
            "sensitivity": sens.sensitivity.tolist(),
            "prefetch_accuracy": sens.prefetch_accuracy.tolist(),
            "top1_share": top1.tolist(),
            "calib_tokens": sens.tokens,
        },
    )
