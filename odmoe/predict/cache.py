"""Expert-cache comparators replayed on captured traces: LRU, LFU and MoE-Infinity's activation-aware eviction.

Cache-hit rate as the paper uses it (BASELINES.md §0.1): the fraction of activated experts that
are resident at use time, over every decode iteration and MoE layer (prefill only warms the cache
and is not counted). Choices (the systems differ; these make them comparable):

* one cache per MoE layer holding ``capacity`` experts (Mixtral-Offloading's eviction group; the
  same per-layer budget for every policy, so total size = capacity x layers);
* the cache starts empty for every request and is warmed by the prefill's routing;
* a miss loads the expert (on the critical path) and evicts a victim; experts being used or
  loaded right now are never victims;
* prefetch: at knowledge point (n, j) the paired predictor's top-k for slot j + ``distance`` is
  inserted (d = 1 is Mixtral-Offloading's speculative loading); nothing is prefetched for slot 0
  of a token (it would be a cross-token prediction, outside the harness);
* LRU: victim = least recently used or inserted; LFU: victim = fewest activations in this request
  so far (counts kept for evicted experts too, prefetches do not count), ties by recency;
  activation-aware (MoE-Infinity): victim = lowest activation frequency of that layer in the
  calibration EAM best matching the request so far, ties by recency.

With no cache (capacity 0) prefetched experts are held only until their layer runs (OD-MoE's
workers), so the hit rate is the predictor's recall at ``distance`` — the cacheless case (PAPER.md §7).
"""

from __future__ import annotations

import numpy as np

from odmoe.errors import OdmoeError
from odmoe.predict.harness import Capture, PastView
from odmoe.predict.predictors import EAMPredictor, eam_of

POLICIES = ("lru", "lfu", "activation")


class _LayerCaches:
    """Per-layer caches in plain Python (small sets; numpy per call would dominate the run time)."""

    def __init__(self, policy: str, slots: int, experts: int, capacity: int):
        if policy not in POLICIES:
            raise OdmoeError(f"unknown cache policy {policy!r}; use one of {', '.join(POLICIES)}")
        if capacity < 0 or capacity > experts:
            raise OdmoeError(f"cache capacity {capacity} per layer outside 0..{experts} experts")
        self.policy, self.capacity = policy, capacity
        self.resident: list[dict[int, int]] = [{} for _ in range(slots)]  # expert -> last use/insert time
        self.freq = [[0] * experts for _ in range(slots)]
        self.staged: list[set[int]] = [set() for _ in range(slots)]  # capacity 0: prefetched, held until used
        self.clock = 0

    def _victim(self, slot: int, pinned, rank) -> int:
        cache = self.resident[slot]
        cand = [e for e in cache if e not in pinned]
        if not cand:
            return -1
        if self.policy == "lru":
            return min(cand, key=cache.__getitem__)
        if self.policy == "lfu":
            freq = self.freq[slot]
            return min(cand, key=lambda e: (freq[e], cache[e]))
        return min(cand, key=lambda e: (rank[e], cache[e]))

    def insert(self, slot: int, expert: int, pinned, rank, prefetch: bool = False) -> None:
        self.clock += 1
        cache = self.resident[slot]
        if expert not in cache:
            if self.capacity == 0:
                if prefetch:
                    self.staged[slot].add(expert)
                return
            if len(cache) >= self.capacity:
                victim = self._victim(slot, pinned, rank)
                if victim < 0:
                    return
                del cache[victim]
        cache[expert] = self.clock

    def access(self, slot: int, experts, rank) -> int:
        """Use the experts of one token at one layer; returns how many were resident."""
        cache, staged = self.resident[slot], self.staged[slot]
        hit = sum(1 for e in experts if e in cache or e in staged)
        staged.clear()
        for e in experts:
            self.freq[slot][e] += 1
            self.insert(slot, e, experts, rank)
        return hit


def simulate(
    capture: Capture,
    policy: str,
    capacity: int,
    prefetch: np.ndarray | None = None,
    distance: int = 1,
    eam: EAMPredictor | None = None,
    matches: np.ndarray | None = None,
) -> tuple[int, int]:
    """Replay one request: (hits, accesses) over its decode iterations.

    ``prefetch``: the paired predictor's ``harness.predictions`` [O, Lm, D, k]; ``distance``: which
    d to prefetch at. ``activation`` needs ``eam`` (fitted) or precomputed ``matches`` [O, Lm, Lm, E]
    (``eam_matches``).
    """
    t = capture.trace
    out_len, lm, k = t.decode_experts.shape
    e = capture.decode["p"].shape[-1]
    caches = _LayerCaches(policy, lm, e, capacity)
    if policy == "activation" and matches is None:
        if eam is None:
            raise OdmoeError("the activation-aware cache needs a fitted EAM predictor (MoE-Infinity's EAMC)")
        matches = eam_matches(eam, capture)
    if prefetch is not None and not (1 <= distance <= prefetch.shape[2]):
        raise OdmoeError(f"prefetch distance {distance} outside the predictions' 1..{prefetch.shape[2]}")
    # warm-up on the prefill (activation-aware ranks by the EAM matched on the prompt alone)
    warm_rank = None
    if policy == "activation":
        prompt_eam = eam_of(t.prefill_experts, np.zeros((0, lm, k), int), np.zeros((0, k), int), lm, e)
        warm_rank = eam.match_counts(prompt_eam) if eam is not None else matches[0, 0]
    prefill = t.prefill_experts.tolist()
    decode = t.decode_experts.tolist()
    pf = None if prefetch is None else prefetch[:, :, distance - 1].tolist()
    rk = None if matches is None else matches.tolist()
    for pos in range(len(prefill)):
        for j in range(lm):
            caches.access(j, prefill[pos][j], None if warm_rank is None else list(warm_rank[j]))
    hits = accesses = 0
    for n in range(out_len):
        for j in range(lm):
            rank = None if rk is None else rk[n][j]
            hits += caches.access(j, decode[n][j], None if rank is None else rank[j])
            accesses += k
            target = j + distance
            if pf is not None and target < lm:
                pred = [x for x in pf[n][j] if x >= 0]
                for x in pred:
                    caches.insert(target, x, pred, None if rank is None else rank[target], prefetch=True)
    return hits, accesses


def eam_matches(eam: EAMPredictor, capture: Capture) -> np.ndarray:
    """MoE-Infinity's matched EAM (per-layer frequencies) at every knowledge point: [O, Lm, Lm, E]."""
    out_len, lm = capture.output_len, capture.num_slots
    out = np.zeros((out_len, lm, lm, eam.library.shape[-1]))
    for n in range(1, out_len + 1):
        for j in range(lm):
            out[n - 1, j] = eam.match(PastView(capture, n, j))
    return out
