"""The discrete-event simulator: exact schedules, Eq. 1 at its boundary, the compute-and-network path."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from odmoe.costs import FixedCosts, Formats, ModelCosts
from odmoe.hardware import load_profile
from odmoe.sim import recall as rc
from odmoe.sim.analysis import eq1_budget, eq1_table, io_bound_tok_s, node_memory, solve_increasing
from odmoe.sim.distributed import Layout, ODMoEConfig, simulate_decode, simulate_prefill, simulate_request
from odmoe.sim.shapes import load_shape


def toy(layers: int, experts: int = 4, k: int = 2):
    return replace(
        load_shape("tiny-mixtral"),
        num_layers=layers,
        moe_layers=tuple(range(layers)),
        num_experts=experts,
        top_k=k,
    )


def test_two_layer_schedule_matches_hand_computation():
    # 2 MoE layers, top-2, 4 workers -> 2 groups of 2; token + KV alignment every iteration; one miss in
    # iteration 2, layer 2 (worked out by hand in the comments).
    shape = toy(2)
    costs = FixedCosts(t_main=1, t_expert=2, t_load=3, t_shadow=0.5, t_head=0.5, latency=0.25)
    cfg = ODMoEConfig(num_workers=4, predictor="shadow", token_period=1, kv_period=1)
    hits = np.array([[2, 2], [2, 1]])
    res = simulate_decode(shape, costs, cfg, hits)
    # iteration 1: shadow S1 0-0.5 (prediction at 0.75), S2 0.5-1 (1.25). M1 0-1, input at workers 1.25; load
    # 0.75-3.75, EC1 3.75-5.75, back at 6. M2 6-7, input 7.25; load 1.25-4.25, EC2 7.25-9.25, back 9.5; head -> 10.
    # iteration 2: alignment reaches the shadow at 10.25 (late departure): predictions at 11 and 11.5. M1 10-11,
    # input 11.25; load 11-14 (buffer free since 5.75), EC1 14-16, back 16.25. M2 16.25-17.25, input 17.5; loads
    # 11.5-14.5; worker 4 reloads its wrong expert 17.5-20.5, EC2 20.5-22.5, back 22.75; head -> 23.25.
    assert res.token_times.tolist() == [10.0, 23.25]
    assert res.stall.tolist() == [[2.5, 0.0], [2.75, 3.0]]
    assert res.late_loads.tolist() == [[0, 0], [0, 1]]
    assert res.time == 23.25


def test_layout_groups_round_robin_and_set_matching():
    lay = Layout.of(toy(8), ODMoEConfig(num_workers=8))
    assert lay.num_groups == 4 and [lay.workers(j) for j in (0, 1, 4)] == [[0, 1], [2, 3], [0, 1]]
    assert lay.misses(2, 1) == [0, 1] and lay.misses(2, 0) == [1, 1]
    top8 = Layout.of(toy(8, experts=64, k=8), ODMoEConfig(num_workers=8, group_size=2))
    assert top8.num_groups == 4 and top8.share == (4, 4) and top8.misses(8, 5) == [1, 2]
    with pytest.raises(Exception, match="groups of 2"):
        Layout.of(toy(8), ODMoEConfig(num_workers=7))


@pytest.mark.parametrize("latency", [0.0, 0.25])
def test_eq1_holds_at_the_boundary(latency):
    shape = toy(8)
    cfg = ODMoEConfig(num_workers=8, predictor="ahead")
    base = FixedCosts(t_main=1, t_expert=2, latency=latency)
    table = eq1_table(shape, base, cfg)
    budget = eq1_budget(1 + latency, 2 + latency, 4)  # NG t^M + (NG-1) t^W with the hops inside t^M and t^W
    assert table["budget_s"].tolist() == [budget] * 8
    window = budget + latency  # the expert is due when the hidden vector reaches the worker
    hits = rc.perfect(6, 8, 2)
    at = simulate_decode(shape, replace(base, t_load=window), cfg, hits)
    over = simulate_decode(shape, replace(base, t_load=window + 2**-10), cfg, hits)
    assert at.stall[1:].max() == 0.0  # iteration 1 fills the pipeline; steady state from iteration 2
    assert (over.stall[1:].sum(axis=1) > 0).all()  # every iteration now waits for a copy somewhere
    assert eq1_table(shape, replace(base, t_load=window), cfg)["fits"].all()
    assert not eq1_table(shape, replace(base, t_load=window + 2**-10), cfg)["fits"].any()


def test_perfect_recall_and_infinite_bandwidth_give_the_compute_and_network_path():
    shape = load_shape("mixtral-8x7b")
    hw = load_profile("rtx3090-testbed").with_(h2d_bandwidth=math.inf, h2d_latency=0.0)
    costs = ModelCosts(shape, hw)
    n, ctx0 = 6, 16
    res = simulate_decode(shape, costs, ODMoEConfig(num_workers=8), rc.perfect(n, 32, 2), ctx0=ctx0)
    wire, lat = costs.wire(costs.act_bytes(1)), costs.latency
    # per layer: M_l, two hidden vectors through the main NIC, latency, expert, the later output's bytes, latency
    path = sum(
        sum(costs.main(i, 1, ctx0 + t) + 3 * wire + 2 * lat + costs.expert(1, 1) for i in range(32))
        + costs.head(1)
        for t in range(n)
    )
    assert res.time == pytest.approx(path, rel=1e-12)
    assert res.stall.max() == 0.0


def test_misses_cost_a_reload_and_late_departure_stalls_the_first_layers():
    shape = load_shape("mixtral-8x7b")
    costs = ModelCosts(shape, load_profile("rtx3090-testbed"))
    cfg = ODMoEConfig(num_workers=8)
    perfect = simulate_decode(shape, costs, cfg, rc.perfect(20, 32, 2), ctx0=16)
    per_layer = perfect.stall[1:].mean(0)
    assert per_layer[0] == pytest.approx(costs.load(), rel=0.02)  # layer 1 always waits for a whole copy
    assert per_layer[1] > 1e-3 and per_layer[2:].max() < per_layer[1]  # layer 2 loses its prediction lead
    hits = rc.perfect(20, 32, 2)
    hits[10, 20] = 1
    missed = simulate_decode(shape, costs, cfg, hits, ctx0=16)
    assert missed.late_loads.sum() == 1
    assert missed.time - perfect.time == pytest.approx(costs.load(), rel=0.1)
    unaligned = simulate_decode(
        shape, costs, replace(cfg, token_period=0, kv_period=0), rc.perfect(20, 32, 2), ctx0=16
    )
    assert unaligned.time < perfect.time  # no late departure
    assert unaligned.stall[2:, 0].max() == 0.0  # the shadow runs a token ahead: even layer 1 is predicted


@pytest.mark.parametrize("period", [None, 1])
def test_decode_starts_from_what_the_prefill_left(period):
    """As the runtime does (found by the two-schedules check, docs/simulator.md): the shadow's own prefill
    starts when the main's START reaches it; without token alignment it starts decoding when that prefill
    ends, long before the main's first token here; with it, when the first token reaches it (ttft + latency).
    A worker's first decode copy waits for its last prefill compute."""
    shape = toy(2)
    costs = FixedCosts(t_main=1, t_expert=2, t_load=3, t_shadow=0.5, t_head=0.5, latency=0.25)
    cfg = ODMoEConfig(num_workers=4, predictor="shadow", token_period=period, kv_period=period)
    res = simulate_request(shape, costs, cfg, 4, 3, np.full((2, 2), 2), record=1)
    spans = res.decode.timeline.spans
    (prefill,) = [s for s in spans if s[:3] == ("shadow", "S", -1)]
    assert prefill[4:] == (0.25, 0.25 + 2 * 4 * 0.5)  # START's latency, then 2 layers x 4 tokens x 0.5
    first = min(s[4] for s in spans if s[:3] == ("shadow", "S", 0))
    assert first == (prefill[5] if period is None else res.ttft + 0.25)
    assert prefill[5] < res.ttft
    for w in range(4):
        computed = max(s[5] for s in spans if s[0] == f"worker {w}" and s[1] == "compute" and s[2] == -1)
        loads = [s[4] for s in spans if s[0] == f"worker {w}" and s[1] == "load" and s[2] == 0]
        assert loads and min(loads) >= computed


def test_prefill_serial_is_slower_than_overlapped_and_grows_with_the_prompt():
    shape = load_shape("mixtral-8x7b")
    costs = ModelCosts(shape, load_profile("rtx3090-testbed"))
    serial = {p: simulate_prefill(shape, costs, ODMoEConfig(), p)[0] for p in (16, 128)}
    overlap = simulate_prefill(shape, costs, ODMoEConfig(prefill_overlap=True), 128)[0]
    assert serial[128] > serial[16] > 32 * costs.load()  # every layer waits for its expert copy
    assert overlap < serial[128]


def test_physical_bound_and_memory():
    shape = load_shape("mixtral-8x7b")
    assert io_bound_tok_s(shape, 8, 24e9) == pytest.approx(4.25, rel=0.01)  # PAPER.md §10.4
    mem = node_memory(shape, Formats(), ODMoEConfig(num_workers=8), positions=272)
    assert mem["worker"] < 1e9 and 6e9 < mem["main"] < 7.5e9 and 44e9 < mem["shadow"] < 50e9
    assert mem["odmoe_total"] == pytest.approx(60e9, rel=0.05) and mem["cached_total"] > 180e9


def test_solve_increasing():
    assert solve_increasing(lambda x: x**3, 8.0, 0.0, 5.0, tol=1e-9) == pytest.approx(2.0, rel=1e-6)
    assert math.isnan(solve_increasing(lambda x: x, 10.0, 0.0, 1.0))
