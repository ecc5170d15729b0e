"""Unit tests of the engine's parts on hand-built inputs: eviction rules, cache, link, low-bit format,
and the policies' rules (HOBBIT precision classes, AdapMoE gating and DP sizing)."""

from __future__ import annotations

import numpy as np
import torch

from baselines.adapmoe import adaptive_keep, dp_cache_sizes, lru_misses
from baselines.cache import LFU, LRU, Entry, EvictionContext, ExpertCache, MultiDim, ScoreEviction
from baselines.hobbit import HIGH, LOW, SKIP, precision_class
from baselines.lowbit import nf4_codes, nf4_roundtrip
from baselines.timing import Clock, EmulatedLink


def _replay(cache: ExpertCache, accesses, num_layers=4, protected=()):
    """Access keys in order (load on miss, bump recency/frequency); return the evicted keys."""
    tick = 0
    for key in accesses:
        tick += 1
        ctx = EvictionContext(layer=key[0], num_layers=num_layers, tick=tick)
        entry = cache.get(key)
        if entry is None:
            assert cache.make_room(key, 1, protected, ctx) is not None
            entry = Entry(key, 1, inserted=tick)
            cache.insert(entry)
        entry.last_use = tick
        entry.uses += 1
    return cache.evicted


def test_lru_evicts_least_recently_used():
    cache = ExpertCache({None: 2}, LRU())
    a, b, c = (0, 0, "fp32"), (0, 1, "fp32"), (0, 2, "fp32")
    assert _replay(cache, [a, b, a, c]) == [b]  # b is older than the re-used a
    assert _replay(cache, [b]) == [b, a]


def test_lfu_evicts_least_frequently_used():
    cache = ExpertCache({None: 2}, LFU())
    a, b, c = (0, 0, "fp32"), (0, 1, "fp32"), (0, 2, "fp32")
    assert _replay(cache, [a, a, a, b, c]) == [b]  # b used once, a three times (LRU would also say b)
    cache = ExpertCache({None: 2}, LFU())
    assert _replay(cache, [a, a, b, a, b, b, b, c]) == [a]  # a: 3 uses, b: 4 (LRU would also say a)


def test_per_layer_groups_evict_within_their_layer():
    cache = ExpertCache({0: 1, 1: 1}, LRU(), group_of=lambda k: k[0])
    assert _replay(cache, [(0, 0, "fp32"), (1, 0, "fp32"), (0, 1, "fp32")]) == [(0, 0, "fp32")]


def test_protected_entries_are_never_evicted():
    cache = ExpertCache({None: 2}, LRU())
    a, b, c = (0, 0, "fp32"), (0, 1, "fp32"), (0, 2, "fp32")
    _replay(cache, [a, b])
    ctx = EvictionContext(0, 4, 9)
    assert [e.key for e in cache.make_room(c, 1, {a}, ctx)] == [b]
    assert cache.make_room(c, 2, {a}, ctx) is None  # only one evictable slot


def test_score_eviction_evicts_lowest_score():
    scores = {0: 0.9, 1: 0.1, 2: 0.5}
    cache = ExpertCache({None: 2}, ScoreEviction(lambda e, ctx: scores[e.expert]))
    assert _replay(cache, [(0, 1, "fp32"), (0, 0, "fp32"), (0, 2, "fp32")]) == [(0, 1, "fp32")]


def test_multidim_prefers_keeping_near_frequent_high_precision_experts():
    rule = MultiDim()
    near = Entry((1, 0, "fp32"), 1, last_use=5, uses=3, full_uses=3)
    far = Entry((3, 0, "nf4"), 1, last_use=5, uses=3, full_uses=0)  # further away, never high precision
    assert rule.victim([near, far], EvictionContext(layer=1, num_layers=4, tick=6)) is far
    old = Entry((1, 1, "fp32"), 1, last_use=1, uses=1, full_uses=1)
    assert rule.victim([near, old], EvictionContext(layer=1, num_layers=4, tick=6)) is old


def test_link_is_fifo_and_stalls_are_accounted():
    t = [0.0]
    clock = Clock(timer=lambda: t[0])
    link = EmulatedLink(bandwidth=100.0, latency=0.5)
    d1 = link.transfer(100, clock.now())  # 0.5 + 1.0
    d2 = link.transfer(50, clock.now())  # queued behind the first
    assert (d1, d2) == (1.5, 2.5)
    t[0] = 1.0
    assert link.wait(d1, clock) == 0.5 and clock.now() == 1.5
    assert link.wait(d2, clock) == 1.0 and clock.stall == 1.5
    t[0] = 10.0
    assert link.wait(link.transfer(0, 0.0), clock) == 0.0  # finished long ago: no stall


def test_nf4_matches_bitsandbytes():
    import bitsandbytes.functional as bf

    torch.manual_seed(0)
    w = torch.randn(64, 48)
    q, qs = bf.quantize_4bit(w.half(), blocksize=64, quant_type="nf4", compress_statistics=False)
    ref = bf.dequantize_4bit(q, qs).float()
    ours = nf4_roundtrip(w)
    close = (ours - ref).abs() <= 1e-3 + 3e-3 * ref.abs()  # fp16 rounding aside: the same grid and scales
    assert close.float().mean() > 0.999
    assert len(torch.unique(nf4_codes(w)[0])) <= 16
    assert not torch.equal(ours, w)


def test_hobbit_precision_classes():
    w = torch.tensor([[0.95, 0.05], [0.7, 0.3], [0.55, 0.45], [0.2, 0.8]])
    cls = precision_class(w, 0.6, 0.9)
    assert cls.tolist() == [[HIGH, SKIP], [HIGH, LOW], [HIGH, HIGH], [LOW, HIGH]]
    assert (precision_class(w, 2.0, 2.0) == HIGH).all()


def test_adaptive_gating_keeps_first_and_drops_light_second():
    w = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    assert adaptive_keep(w, 0.2).tolist() == [[True, False], [True, True]]


def test_lru_misses_and_dp_sizes():
    assert lru_misses([[0, 1], [0, 2], [1]], 2) == 4
    # layer 0 gains a lot from a second slot, layer 1 nothing: the DP gives the slot to layer 0
    misses = np.array([[10, 2, 2, 2], [5, 5, 5, 5]], dtype=float)
    assert dp_cache_sizes(misses, 3) == [2, 1]
    assert sum(dp_cache_sizes(misses, 6)) == 6
