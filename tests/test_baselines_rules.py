"""Unit tests of the engine's parts on hand-built inputs: eviction rules, cache, link, low-bit formats,
and the policies' rules (HOBBIT precision classes, AdapMoE gating and DP sizing, MoE-Infinity's EAMC)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baselines.adapmoe import adaptive_keep, dp_cache_sizes, expected_loads, thresholds
from baselines.cache import LFU, LRU, Entry, EvictionContext, ExpertCache, MultiDim, ScoreEviction
from baselines.hobbit import HIGH, LOW, SKIP, precision_class
from baselines.lowbit import HQQ_CONFIGS, HQQMatrix, make_format, nf4_codes, nf4_roundtrip, packed_bytes
from baselines.predict import ActivationMatrixTracer
from baselines.timing import VirtualLink
from odmoe.clock import Clock


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
    clock = Clock("modelled")
    link = VirtualLink(100.0, setup=0.5)
    d1 = link.transfer(100, clock.now())  # 0.5 + 1.0
    d2 = link.transfer(50, clock.now())  # queued behind the first
    assert (d1, d2) == (1.5, 2.5)
    clock.charge(1.0)
    assert link.wait(d1, clock) == 0.5 and clock.now() == 1.5
    assert link.wait(d2, clock) == 1.0 and clock.stall == 1.5
    clock.charge(7.5)
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


def test_dp_gives_slots_where_they_save_most_loads():
    # layer 0 gains a lot from a second slot, layer 1 nothing: the DP gives the slot to layer 0
    cost = np.array([[10, 2, 2, 2], [5, 5, 5, 5]], dtype=float)
    assert dp_cache_sizes(cost, 3) == [2, 1]
    assert sum(dp_cache_sizes(cost, 6)) == 6


def test_adapmoe_expected_loads_and_dp_differ_from_uniform():
    """src/dp.py's cost: fewer loads with a bigger cache, a better prefetch or more single-expert tokens;
    layers with a poor prefetch and no single-expert tokens get more of the budget than uniform."""
    E = 8
    assert expected_loads(0.0, 0.0, E, E) == 0.0
    assert expected_loads(0.0, 0.0, 0, E) == 2.0  # nothing cached, nothing prefetched: both experts load
    assert expected_loads(0.0, 1.0, 0, E) == 1.0  # every token single-expert
    assert expected_loads(0.9, 0.0, 2, E) < expected_loads(0.5, 0.0, 2, E) < expected_loads(0.5, 0.0, 1, E)
    acc, top1 = [0.0, 0.9, 0.9, 0.9], [0.0, 0.5, 0.5, 0.5]
    cost = np.array(
        [[expected_loads(a, t, s, E) for s in range(1, E + 1)] for a, t in zip(acc, top1, strict=True)]
    )
    sizes = dp_cache_sizes(cost, 16)
    assert sum(sizes) == 16 and sizes != [4, 4, 4, 4] and sizes[0] > 4
    total = sum(cost[i, s - 1] for i, s in enumerate(sizes))
    assert total < sum(cost[i, 3] for i in range(4))  # strictly fewer expected loads than uniform


def test_adapmoe_thresholds_follow_the_sensitivity_budget():
    sens = np.array([40.0, 1.0, 0.01])
    tau = thresholds(sens, 0.01)
    assert np.allclose(tau, np.sqrt(0.01 / sens))  # run.py: sqrt(threshold / weight[idx])
    assert tau[0] < tau[1] < tau[2]  # a sensitive layer keeps more second experts
    assert (thresholds(sens, 0.04) == 2 * tau).all()


@pytest.mark.parametrize("fmt,bits", [("hqq2", 2), ("hqq3", 3)])
def test_hqq_experts_are_really_packed_low_bit(fmt, bits):
    """The hqq package's codes: 2-bit packed 4 per byte, 3-bit 10 per int32; 8-bit scales and zeros;
    at most 2**bits levels; about bits + 16/group bits per weight; unpacking dequantizes close to w."""
    torch.manual_seed(0)
    gate_up, down = torch.randn(128, 32) * 0.05, torch.randn(32, 64) * 0.05
    f = make_format(fmt)
    packed = f.pack(gate_up, down)
    w_q, s_q, _, _, z_q, _, _ = packed[:7]
    n = gate_up.numel()
    g = HQQ_CONFIGS[fmt].group_size
    if bits == 2:
        assert w_q.dtype == torch.uint8 and w_q.numel() == n // 4
    else:  # 10 codes per int32; a group's 64 rows padded to 70
        assert w_q.dtype == torch.int32 and w_q.numel() == -(-g // 10) * (n // g)
    assert s_q.dtype == torch.uint8 and z_q.dtype == torch.uint8
    bits_per_weight = 8 * packed_bytes(packed) / (gate_up.numel() + down.numel())
    code_bits = 8 * w_q.numel() * w_q.element_size() / n  # 2 bits, or 3.5 with the 3-bit padding
    assert bits <= code_bits <= bits + 0.5
    assert code_bits < bits_per_weight < code_bits + 16 / g + 0.2  # + 8-bit scale and zero per group
    gu, dn = f.unpack(packed)
    assert gu.shape == gate_up.shape and dn.dtype == torch.float32
    m = HQQMatrix(gate_up, HQQ_CONFIGS[fmt])
    levels = HQQMatrix.dequantize(m.tensors, m.static).reshape(g, -1)  # one HQQ group per column (axis 0)
    assert max(len(torch.unique(levels[:, j])) for j in range(levels.shape[1])) <= 2**bits
    err = (gu - gate_up).norm() / gate_up.norm()
    assert 0.01 < err < (0.4 if bits == 2 else 0.2)


def test_nf4_format_packs_two_codes_per_byte():
    torch.manual_seed(0)
    gate_up, down = torch.randn(64, 32), torch.randn(32, 32)
    f = make_format("nf4")
    packed = f.pack(gate_up, down)
    assert packed[0].dtype == torch.uint8 and packed[0].numel() == gate_up.numel() // 2
    gu, dn = f.unpack(packed)
    assert torch.equal(gu, nf4_roundtrip(gate_up)) and torch.equal(dn, nf4_roundtrip(down))


def test_eamc_matches_the_most_similar_request_and_keeps_the_offline_trace():
    a = np.zeros((3, 4))
    a[:, 0] = 5  # request type A: expert 0 everywhere
    b = np.zeros((3, 4))
    b[:, 3] = 5  # type B: expert 3 everywhere
    tracer = ActivationMatrixTracer(3, 4, capacity=3)
    tracer.load(np.stack([a, b]))
    tracer.begin()
    tracer.record(0, torch.tensor([[3]]))  # the current request starts like B
    assert (tracer.best_match() == b).all()
    scores = tracer.scores(0)
    assert scores[0].sum() == 0 and scores[1, 3] > scores[2, 3] > 0  # future layers only, decayed
    tracer.end()  # fills the free slot
    tracer.begin()
    tracer.record(0, torch.tensor([[1]]))
    tracer.end()  # collection full: replaces the least-accessed online entry, never the offline ones
    assert len(tracer.collection) == 3 and (tracer.collection[:2] == np.stack([a, b])).all()
    assert tracer.collection[2][0, 1] == 1
