"""Simulator inputs: hardware profiles, model shapes, recall traces, measured times, calibration."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from odmoe.costs import FixedCosts, ModelCosts, load_measured
from odmoe.errors import OdmoeError
from odmoe.hardware import HARDWARE_DIR, load_profile, profile_from_config, profile_names
from odmoe.sim import recall as rc
from odmoe.sim.calibrate import calibrate
from odmoe.sim.distributed import ODMoEConfig, simulate_decode
from odmoe.sim.offload import simulate_cached
from odmoe.sim.paper import CALIBRATION
from odmoe.sim.shapes import load_shape, sim_model_names

NUMERIC = (
    "num_workers",
    "h2d_bandwidth",
    "h2d_latency",
    "net_bandwidth",
    "net_latency",
    "layer_overhead",
    "main_share",
    "host_memory",
)


@pytest.mark.parametrize("name", profile_names())
def test_every_profile_loads_and_every_number_has_a_source(name):
    p = load_profile(name)
    assert p.name == name and isinstance(p.emulated, bool) and p.source
    raw = OmegaConf.to_container(OmegaConf.load(HARDWARE_DIR / f"{name}.yaml"))
    own = [k for k in raw if k in NUMERIC or k in ("main", "worker", "shadow")]
    assert all(k in p.sources for k in own), f"{name}: numbers without a source: {set(own) - set(p.sources)}"


def test_profiles_extend_and_convert():
    base, w80 = load_profile("rtx3090-testbed"), load_profile("rtx3080-workers")
    assert w80.worker.name == "RTX 3080" and w80.main == base.main and w80.h2d_bandwidth == base.h2d_bandwidth
    assert (
        "RTX 3080" in w80.sources["worker"] and w80.sources["h2d_bandwidth"] == base.sources["h2d_bandwidth"]
    )
    assert load_profile("rtx3090-pcie3").h2d_bandwidth < base.h2d_bandwidth / 1.9
    emu = load_profile("cpu-emulated")
    assert emu.emulated and emu.main.memory >= 5e6  # holds tiny-mixtral's non-expert weights
    host = load_profile("host")
    with pytest.raises(OdmoeError, match="host.*lacks h2d_bandwidth"):
        host.need("h2d_bandwidth")
    with pytest.raises(OdmoeError, match="unknown keys"):
        profile_from_config({"name": "x", "emulated": False, "source": "s", "h2d_bw": 1})
    with pytest.raises(OdmoeError, match="no hardware profile"):
        load_profile("no-such-profile")


def test_cpu_emulated_profile_sits_in_the_papers_regime():
    shape = load_shape("tiny-mixtral")
    assert shape.expert_bytes("fp32") == 221_184
    from odmoe.sim.analysis import eq1_table

    table = eq1_table(shape, ModelCosts(shape, load_profile("cpu-emulated")), ODMoEConfig(num_workers=8))
    row = table.iloc[5]
    assert row["load_s"] / (row["t_M_s"] + row["t_W_s"]) == pytest.approx(3.5, rel=0.02)


def test_shapes_from_configs_alone(tmp_path):
    assert {"mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite"} <= set(
        sim_model_names()
    )
    mix = load_shape("mixtral-8x7b")
    assert mix.expert_params == 176_160_768 and mix.total_params == pytest.approx(46.7e9, rel=0.005)
    assert mix.kv_bytes_per_token("fp32") == 256 * 1024  # the paper's KV-alignment payload
    ds = load_shape("deepseek-v2-lite")
    assert ds.moe_layers[0] == 1 and ds.num_moe_layers == 26 and ds.shared_ffn == 2 * 1408
    assert ds.total_params == pytest.approx(15.7e9, rel=0.01) and ds.kv_per_token == 576
    assert load_shape("qwen3-30b-a3b").total_params == pytest.approx(30.5e9, rel=0.01)
    assert load_shape("qwen1.5-moe-a2.7b").total_params == pytest.approx(14.3e9, rel=0.01)
    assert load_shape("olmoe-1b-7b").total_params == pytest.approx(6.9e9, rel=0.01)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(
        json.dumps(
            {
                "model_type": "mixtral",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 3,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
            }
        )
    )
    local = load_shape(str(ckpt))
    assert (local.num_moe_layers, local.num_experts, local.expert_params) == (3, 4, 3 * 64 * 128)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(OdmoeError):
        load_shape(str(ckpt))
    with pytest.raises(OdmoeError, match="no model shape"):
        load_shape("no-such-model")


def test_recall_generators_and_trace_files(tmp_path):
    hits = rc.from_recall(0.9, 400, 32, 2, seed=1)
    assert rc.recall_of(hits, 2) == pytest.approx(0.9, abs=0.01)
    assert (
        rc.from_recall(0.95, 400, 32, 2, seed=1) >= hits
    ).all()  # common random numbers: monotone in recall
    rand = rc.random_prefetch(8, 2, 2000, 32, seed=0)
    assert rc.recall_of(rand, 2) == pytest.approx(0.25, abs=0.01) and (rand == 2).mean() == pytest.approx(
        1 / 28, abs=0.005
    )
    true = np.array([[[1, 2], [3, 4]], [[0, 5], [6, 7]]])
    pred = np.array([[[2, 6], [4, 3]], [[1, 2], [6, 7]]])
    assert rc.from_sets(true, pred).tolist() == [[1, 2], [0, 2]]
    rows = [
        {
            "prompt_id": "a",
            "pos": n + 1,
            "layer": layer,
            "experts": list(true[n, layer]),
            "predicted": list(pred[n, layer]),
        }
        for n in range(2)
        for layer in range(2)
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "trace.parquet")
    assert rc.load_hits(tmp_path / "trace.parquet", 2).tolist() == [[1, 2], [0, 2]]
    pd.DataFrame({"pos": [1, 1, 2, 2], "layer": [0, 1, 0, 1], "hits": [2, 1, 0, 2]}).to_csv(
        tmp_path / "h.csv", index=False
    )
    loaded = rc.load_hits(tmp_path / "h.csv", 2)
    assert rc.fit(loaded, 5, 2).tolist() == [[2, 1], [0, 2], [2, 1], [0, 2], [2, 1]]
    with pytest.raises(OdmoeError, match="MoE layers"):
        rc.fit(loaded, 5, 32)
    with pytest.raises(OdmoeError, match="0..1"):
        rc.load_hits(tmp_path / "h.csv", 1)


def test_measured_times_replace_the_model(tmp_path):
    shape = load_shape("tiny-mixtral")
    base = ModelCosts(shape, load_profile("cpu-emulated"))
    table = pd.DataFrame(
        {
            "layer": [*range(16), -1],
            "main_s": [0.002] * 16 + [0.001],
            "expert_s": [0.003] * 17,
            "load_s": [0.01] * 17,
        }
    )
    table.to_csv(tmp_path / "t.csv", index=False)
    m = load_measured(tmp_path / "t.csv", base)
    assert (m.main(3), m.head(), m.expert(1, 1, layer=3), m.load(), m.load(3)) == (
        0.002,
        0.001,
        0.003,
        0.01,
        0.01,
    )
    assert m.shadow(3) == base.shadow(3) and m.main(3, tokens=16) == base.main(3, tokens=16)  # not measured
    hits = rc.perfect(4, 16, 2)
    slow = simulate_decode(shape, m, ODMoEConfig(predictor="none"), hits)
    fast = simulate_decode(shape, base, ODMoEConfig(predictor="none"), hits)
    assert slow.time > fast.time
    with pytest.raises(OdmoeError, match="no measured timing table"):
        load_measured(tmp_path / "missing.csv", base)


def test_calibration_reproduces_its_two_paper_numbers_and_the_stored_profile():
    shape = load_shape("mixtral-8x7b")
    stored = load_profile("rtx3090-testbed")
    cal = calibrate(shape, stored)
    costs = ModelCosts(shape, cal.profile)
    _, dec = simulate_cached(shape, costs, 16, 256)
    assert 255 / dec == pytest.approx(CALIBRATION["cached_decode"][1], rel=1e-9)
    case6 = simulate_decode(shape, costs, ODMoEConfig(predictor="none"), rc.perfect(255, 32, 2), ctx0=16)
    assert 255 / case6.time == pytest.approx(CALIBRATION["load_after_routing"][1], rel=1e-6)
    assert stored.layer_overhead == pytest.approx(cal.layer_overhead, rel=2e-3)
    assert stored.h2d_bandwidth == pytest.approx(cal.h2d_bandwidth, rel=2e-3)


def test_fixed_costs_are_plain_numbers():
    c = FixedCosts(t_main=2, t_expert=3, bandwidth=4.0, hidden_bytes=8.0)
    assert (c.main(0, tokens=2), c.expert(2, 1), c.wire(c.act_bytes(1))) == (4, 6, 2.0)
