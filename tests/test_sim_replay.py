"""The replay of a single-device executor's record: a hand-computed schedule, and the offload engine's
own records replayed on mean costs reproduce its measured speed (and a wrong link does not)."""

from __future__ import annotations

import pandas as pd
import pytest

from baselines import build_engine
from odmoe.clock import Timing
from odmoe.hardware import load_profile
from odmoe.sim.replay import mean_costs, replay


def _row(step, layer, main, prefetch_s, experts, computed, demand=(), prefetch=(), waits=()):
    return dict(
        step=step,
        layer=layer,
        t_main=main,
        t_plan=0.0,
        t_demand=0.0,
        t_prefetch=prefetch_s,
        t_experts=experts,
        computed=computed,
        demand=list(demand),
        prefetch=list(prefetch),
        deferred=[],
        deferred_after=[],
        waits=list(waits),
    )


def hand_record():
    layers = pd.DataFrame(
        [
            _row(0, 0, 1.0, 0.0, 0.5, 1, demand=[0], waits=[0]),  # a 2 s demand copy at t = 1: stall 2
            _row(1, 0, 1.0, 0.5, 1.0, 2, prefetch=[1], waits=[-1, -1]),  # prefetch at t = 6, arrives at 7
            _row(1, 1, 1.0, 0.0, 0.5, 1, waits=[1]),  # starts experts at 8: no stall
        ]
    )
    steps = pd.DataFrame({"step": [0, 1], "t_tail": [1.0, 1.0], "extra": [0.0, 0.0]})
    transfers = pd.DataFrame({"transfer": [0, 1], "bytes": [2, 1], "kind": ["demand", "prefetch"]})
    return layers, steps, transfers


def test_replay_matches_a_hand_computed_schedule():
    layers, steps, transfers = hand_record()
    costs = {p: mean_costs(layers, steps, p) for p in ("prefill", "decode")}
    assert costs["decode"].expert[0] == pytest.approx(0.5) and costs["decode"].prefetch[0] == pytest.approx(
        0.5
    )
    r = replay(layers, steps, transfers, costs, bandwidth=1.0)
    # prefill: main 1, copy 1 -> 3 (stall 2), expert 0.5, tail 1 = 4.5
    assert (r.ttft, r.prefill_stall) == pytest.approx((4.5, 2.0))
    # decode: 4.5 + 1 + 0.5 (prefetch issued at 6) + 2 x 0.5 = 7; + 1 = 8; layer 1's copy arrived at 7; + 0.5 + 1
    assert (r.decode_time, r.stall) == pytest.approx((5.0, 0.0))
    # a slower link turns the prefetch late: arrival 6 + 4 = 10, waited from 8
    slow = replay(layers, steps, transfers, costs, bandwidth=0.25)
    assert slow.stall == pytest.approx(2.0) and slow.prefill_stall == pytest.approx(8.0)


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("mixtral_offloading", dict(quantize="none", experts_per_layer=2, prefetch=2, writeback=True)),
        ("moe_infinity", dict(cache_fraction=0.1, prefetch_per_layer=2, eamc_traces=8)),
        ("cached", {}),
    ],
)
def test_engine_records_replay_to_the_measured_speed(micro_mixtral, name, cfg):
    lm = micro_mixtral
    hw = load_profile("cpu-emulated")
    prompt = lm.tokenizer("In the beginning God created the heaven and the earth")["input_ids"][:10]
    engine = build_engine(
        name, cfg, lm, hw, Timing("modelled")
    )  # deterministic: the host's load cannot enter
    try:
        result = engine.generate(prompt, 24, record=True)
    finally:
        engine.uninstall()
    rec = result.record
    layers, steps = pd.DataFrame(rec.layers), pd.DataFrame(rec.steps)
    transfers = pd.DataFrame(rec.transfers, columns=["transfer", "bytes", "kind"])
    assert len(steps) == 24 and set(layers.layer) == set(lm.adapter.moe_layers)
    if name != "cached":
        assert len(transfers) > 0 and result.stall > 0
    costs = {p: mean_costs(layers, steps, p) for p in ("prefill", "decode")}
    r = replay(layers, steps, transfers, costs, hw.h2d_bandwidth, hw.h2d_latency or 0.0)
    assert r.ttft == pytest.approx(result.ttft, rel=0.05)
    assert r.decode_time == pytest.approx(result.decode_time, rel=0.05)
    assert r.stall == pytest.approx(result.stall - result.prefill_stall, rel=0.25, abs=1e-3)
    if name != "cached":  # the replay's link is the profile's: a 10x slower one cannot reproduce the run
        slow = replay(layers, steps, transfers, costs, hw.h2d_bandwidth / 10, hw.h2d_latency or 0.0)
        assert slow.decode_time + slow.ttft > 1.5 * (result.decode_time + result.ttft)
