"""Single-device baselines: LRU hits from a routing trace, prefetch, stalls; the fully cached model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from odmoe.costs import FixedCosts, ModelCosts
from odmoe.hardware import load_profile
from odmoe.sim.offload import (
    OffloadPolicy,
    predict_sets,
    simulate_cached,
    simulate_offload,
    synthetic_routing,
)
from odmoe.sim.shapes import load_shape


def toy(layers: int, experts: int = 4, k: int = 2):
    return replace(
        load_shape("tiny-mixtral"),
        num_layers=layers,
        moe_layers=tuple(range(layers)),
        num_experts=experts,
        top_k=k,
    )


def test_lru_hits_and_stalls_by_hand():
    shape = toy(1)
    costs = FixedCosts(t_main=1, t_expert=1, t_load=5)  # a layer: router at +1, experts 2 x 1
    routing = np.array([[[0, 1]], [[0, 2]], [[3, 1]]])
    res = simulate_offload(shape, costs, OffloadPolicy(cache_per_layer=2), routing, prompt_len=0)
    # cache starts {0, 1}: token 1 hits both; token 2 hits 0, copies 2 (evicting 1); token 3 misses 3 and 1
    assert (res.hits, res.lookups) == (3, 6)
    # prefill (0 tokens, nothing routed) is instant. token 1: 0-1 router, experts 1-3. token 2: router 3-4,
    # copy 4-9, experts 9-11. token 3: router 11-12, copies 12-17 and 17-22, experts 22-24.
    assert res.token_times.tolist() == [3.0, 11.0, 24.0]
    assert res.stall == 5 + 10


def test_prefetch_with_a_good_predictor_hides_copies():
    shape = toy(4, experts=8)
    costs = FixedCosts(t_main=2, t_expert=1, t_load=3)
    routing = synthetic_routing(30, 4, 8, 2, seed=0)
    none = simulate_offload(shape, costs, OffloadPolicy(cache_per_layer=2), routing, 0)
    perfect = simulate_offload(
        shape, costs, OffloadPolicy(cache_per_layer=4, prefetch=2), routing, 0, predicted=routing
    )
    poor = simulate_offload(
        shape,
        costs,
        OffloadPolicy(cache_per_layer=4, prefetch=2),
        routing,
        0,
        predicted=predict_sets(routing, 0.3, 8, seed=0),
    )
    assert perfect.stall < poor.stall < none.stall
    assert perfect.decode_time < poor.decode_time < none.decode_time


def test_writeback_doubles_copy_time():
    shape = toy(2, experts=8)
    costs = FixedCosts(t_load=2)
    routing = synthetic_routing(20, 2, 8, 2, seed=1)
    plain = simulate_offload(shape, costs, OffloadPolicy(cache_per_layer=2), routing, 0)
    wb = simulate_offload(shape, costs, OffloadPolicy(cache_per_layer=2, writeback=True), routing, 0)
    assert wb.link_busy == pytest.approx(2 * plain.link_busy) and wb.hits == plain.hits


def test_all_resident_offload_equals_the_cached_model():
    shape = load_shape("mixtral-8x7b")
    costs = ModelCosts(shape, load_profile("rtx3090-testbed"))
    routing = synthetic_routing(15, 32, 8, 2, seed=0)
    res = simulate_offload(shape, costs, OffloadPolicy(cache_per_layer=8, expert_fmt="fp32"), routing, 16)
    _, decode = simulate_cached(shape, costs, 16, 16)
    assert res.hit_rate == 1.0 and res.decode_time == pytest.approx(decode, rel=1e-9)


def test_sticky_routing_raises_lru_hit_rate():
    shape = toy(4, experts=8)
    iid = simulate_offload(
        shape, FixedCosts(), OffloadPolicy(cache_per_layer=4), synthetic_routing(200, 4, 8, 2, 0), 0
    )
    sticky = simulate_offload(
        shape, FixedCosts(), OffloadPolicy(cache_per_layer=4), synthetic_routing(200, 4, 8, 2, 0, 0.8), 0
    )
    assert iid.hit_rate == pytest.approx(0.5, abs=0.07) and sticky.hit_rate > iid.hit_rate + 0.2


def test_routing_from_a_reference_trace(tmp_path):
    from odmoe.sim.distributed import counts_from_routing
    from odmoe.sim.offload import load_routing
    from odmoe.trace import Trace, save_trace

    rng = np.random.default_rng(0)
    experts = lambda n: np.stack([[rng.permutation(8)[:2] for _ in range(16)] for _ in range(n)])  # noqa: E731
    save_trace(
        Trace(
            "p0",
            np.arange(5),
            np.arange(3),
            tuple(range(16)),
            experts(5),
            np.ones((5, 16, 2)),
            experts(3),
            np.ones((3, 16, 2)),
        ),
        tmp_path,
    )
    routing, prefill = load_routing(str(tmp_path), 7, 16)
    assert routing.shape == (7, 16, 2) and (routing[3:6] == routing[:3]).all() and prefill.shape == (5, 16, 2)
    assert counts_from_routing(load_shape("tiny-mixtral"), prefill).sum(1).tolist() == [10.0] * 16
    shape = load_shape("tiny-mixtral")
    res = simulate_offload(
        shape, FixedCosts(), OffloadPolicy(cache_per_layer=2), routing, 5, prefill_routing=prefill
    )
    assert res.lookups == 7 * 16 * 2
    with pytest.raises(Exception, match="MoE layers"):
        load_routing(str(tmp_path), 7, 32)
