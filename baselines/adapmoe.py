"""Re-implementation of AdapMoE (Zhong et al., ICCAD'24, arXiv 2408.10284; BASELINES.md §2.4).

* Adaptive gating: a token's second (and later) expert is dropped when its gate weight is below ``tau``;
  the kept weights are renormalized (the top-1 fallback gives the first expert weight 1). ``tau: null``
  (default) calibrates it on calibration-split reference decodes so that ``drop_share`` (default 0.5)
  of second experts are dropped — the paper's -25% activated experts at top-2. The paper calibrates
  with Hessian sensitivity (scripts unreleased); a weight quantile reproduces its reported rate.
* Prefetch (decode): layer l+1's gate on layer l's state, top-2, and the first predicted expert not
  already cached is prefetched — one per layer, as ``experts.check`` in the public code.
* Per-layer LRU caches whose sizes are chosen by dynamic programming: with each layer's LRU misses
  m_l(s) simulated on the calibration routing (after adaptive gating), minimize sum_l m_l(s_l) subject
  to sum_l s_l = budget, 1 <= s_l <= E (the knapsack of ``src/dp.py``; its sensitivity weighting is
  unpublished, so misses count equally).
* Experts in NF4 (``quantize: nf4``, default; HQQ in the paper) or fp32 (``none``).
* Budget ``cache_fraction`` of all experts (default 0.44: (8 GB - about 1.6 GB of 4/16-bit non-expert
  weights) / 57 MB 2-bit experts = 112 of 256).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from baselines.cache import LRU
from baselines.calibrate import calibration_traces
from baselines.engine import Policy, full_plan
from baselines.predict import StackedGates
from odmoe.errors import OdmoeError


def adaptive_keep(weights: torch.Tensor, tau: float) -> torch.Tensor:
    """[T, k] bool: the first expert always, later ones when their weight >= tau."""
    keep = weights >= tau
    keep[:, 0] = True
    return keep


def lru_misses(accesses: list[list[int]], capacity: int) -> int:
    """Misses of an LRU cache of ``capacity`` experts on a sequence of per-token expert sets."""
    cache: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for experts in accesses:
        for e in experts:
            if e in cache:
                cache.move_to_end(e)
            else:
                misses += 1
                cache[e] = None
        while len(cache) > capacity:
            cache.popitem(last=False)
    return misses


def dp_cache_sizes(misses: np.ndarray, budget: int) -> list[int]:
    """Sizes s_l (1..E) with sum = budget minimizing sum_l misses[l, s_l - 1] (misses: [L, E])."""
    L, E = misses.shape
    budget = int(min(max(budget, L), L * E))
    inf = float("inf")
    best = np.full((L + 1, budget + 1), inf)
    choice = np.zeros((L + 1, budget + 1), dtype=int)
    best[0, 0] = 0.0
    for layer in range(1, L + 1):
        for b in range(budget + 1):
            for s in range(1, min(E, b) + 1):
                v = best[layer - 1, b - s] + misses[layer - 1, s - 1]
                if v < best[layer, b]:
                    best[layer, b], choice[layer, b] = v, s
    sizes, b = [], budget
    for layer in range(L, 0, -1):
        sizes.append(int(choice[layer, b]))
        b -= choice[layer, b]
    return sizes[::-1]


class AdapMoE(Policy):
    name = "adapmoe"

    def __init__(self, sizes: list[int], tau: float, quantize: str = "nf4", prefetch: bool = True):
        if quantize not in ("nf4", "none"):
            raise OdmoeError(f"adapmoe.quantize must be nf4 or none, got {quantize!r}")
        self.sizes = list(sizes)
        self.tau = float(tau)
        self.fmt = "nf4" if quantize == "nf4" else "fp32"
        self.do_prefetch = bool(prefetch)
        self.gates = None

    @property
    def lossy(self) -> bool:
        return self.fmt != "fp32" or self.tau > 0

    def capacity(self, engine):
        return {
            layer: s * engine.fmt_bytes[self.fmt] for layer, s in zip(engine.layers, self.sizes, strict=False)
        }, lambda k: k[0]

    def make_eviction(self):
        return LRU()

    def plan(self, engine, layer, hidden, idx, w):
        if self.tau <= 0:
            return full_plan(idx, self.fmt), w
        keep = adaptive_keep(w, self.tau)
        w = w * keep
        w = w / w.sum(dim=-1, keepdim=True)
        return full_plan(idx, self.fmt, keep), w

    def prefetch(self, engine, layer, hidden, idx, w):
        if not self.do_prefetch or hidden.shape[0] != 1:
            return
        if self.gates is None:
            self.gates = StackedGates(engine.adapter, 1)
        for target, _, experts in self.gates.predict(layer, hidden, engine.adapter.top_k):
            for e in experts[0].tolist():
                if (target, e, self.fmt) not in engine.cache:
                    engine.prefetch([(target, e, self.fmt)])
                    break


def build(cfg: dict, lm, hardware) -> AdapMoE:
    adapter = lm.adapter
    L, E = adapter.num_moe_layers, adapter.num_experts
    traces = calibration_traces(lm, int(cfg.get("calib_prompts", 2)))
    weights = np.concatenate([t.decode_weights for t in traces])  # [N, L, k]
    experts = np.concatenate([t.decode_experts for t in traces])
    tau = cfg.get("tau")
    if tau is None:
        tau = (
            float(np.quantile(weights[..., 1], float(cfg.get("drop_share", 0.5))))
            if weights.shape[-1] > 1
            else 0.0
        )
    budget = max(L, round(float(cfg.get("cache_fraction", 0.44)) * L * E))
    misses = np.zeros((L, E))
    for s in range(L):
        keep = weights[:, s] >= tau
        keep[:, 0] = True
        accesses = [list(experts[n, s][keep[n]]) for n in range(len(experts))]
        misses[s] = [lru_misses(accesses, c) for c in range(1, E + 1)]
    sizes = dp_cache_sizes(misses, budget)
    return AdapMoE(sizes, tau, cfg.get("quantize", "nf4"), cfg.get("prefetch", True))
