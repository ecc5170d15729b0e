"""The simulator's experiments in-process (small settings), and its headline agreement with the paper."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from odmoe.costs import ModelCosts
from odmoe.errors import OdmoeError
from odmoe.hardware import load_profile
from odmoe.paths import repo_root
from odmoe.record import ExecutorRecord, save_records
from odmoe.results import Run
from odmoe.sim import recall as rc
from odmoe.sim.distributed import ODMoEConfig, simulate_decode, simulate_request
from odmoe.sim.paper import FIG8, RECALL, TABLE2
from odmoe.sim.shapes import load_shape


def run_exp(name: str, tmp_path, *overrides: str) -> tuple[dict, Run]:
    with initialize_config_dir(config_dir=str(repo_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+exp={name}", *overrides])
    run = Run(tmp_path / name, name, OmegaConf.to_container(cfg, resolve=True))
    summary = importlib.import_module(f"experiments.{name}").run(cfg, run)
    return run.finish(summary), run


def test_sim_experiment_writes_every_output(tmp_path):
    summary, run = run_exp(
        "sim",
        tmp_path,
        "hardware=cpu-emulated",
        "exp.model=model",
        "exp.output_len=12",
        "exp.seeds=1",
        "exp.whatif.workers=[4,8]",
        "exp.whatif.h2d_gbps=[0.02,0.06]",
        "exp.whatif.recalls=[0.5,1.0]",
    )
    assert summary["model"] == "tiny-mixtral" and summary["hardware_emulated"] is True
    assert 0 < summary["odmoe_decode_tok_s"] < summary["cached_decode_tok_s"]
    assert summary["memory_worker_gb"] * 1e9 == pytest.approx(221_184)
    for name in ("requests", "gantt", "stalls", "eq1", "memory", "whatif"):
        assert len(pd.read_csv(run.path(f"{name}.csv")))
    for fig in ("gantt.png", "eq1.png", "whatif.png"):
        assert run.path(fig).stat().st_size > 10_000
    gantt = pd.read_csv(run.path("gantt.csv"))
    assert {"main", "shadow", "worker 0", "worker 7"} <= set(gantt["resource"])
    assert {"M", "S", "load", "compute"} <= set(gantt["kind"])
    whatif = pd.read_csv(run.path("whatif.csv"))
    assert (whatif["odmoe_tok_s"] <= whatif["io_bound_tok_s"] * (1 + 1e-9)).all()
    json.dumps(summary)


def test_sim_measured_needs_the_runtime_outputs_and_reads_them(tmp_path):
    with pytest.raises(OdmoeError, match="needs a measured run: exp.e2e_run"):
        run_exp("sim_measured", tmp_path / "a")
    shape = load_shape("tiny-mixtral")
    times = pd.DataFrame({"layer": range(16), "main_s": 0.001, "expert_s": 0.0012, "load_s": 0.006})
    times.to_csv(tmp_path / "times.csv", index=False)
    hits = rc.from_recall(0.9, 20, 16, 2, seed=0)
    pd.DataFrame(
        {"pos": np.repeat(np.arange(1, 21), 16), "layer": np.tile(np.arange(16), 20), "hits": hits.ravel()}
    ).to_csv(tmp_path / "trace.csv", index=False)
    from odmoe.costs import load_measured

    costs = load_measured(tmp_path / "times.csv", ModelCosts(shape, load_profile("cpu-emulated")))
    sim = simulate_request(shape, costs, ODMoEConfig(num_workers=8), 16, 21, hits)
    pd.DataFrame(
        [
            {
                "prompt_len": 16,
                "output_len": 21,
                "ttft_s": sim.ttft * 1.1,
                "decode_tok_s": sim.decode_tok_s,
                "output_tok_s": sim.output_tok_s,
            }
        ]
    ).to_csv(tmp_path / "measured.csv", index=False)
    summary, run = run_exp(
        "sim_measured",
        tmp_path / "b",
        f"exp.layer_times={tmp_path / 'times.csv'}",
        f"exp.recall_trace={tmp_path / 'trace.csv'}",
        f"exp.measured={tmp_path / 'measured.csv'}",
    )
    assert summary["decode_tok_s_max_abs_err_pct"] == pytest.approx(0.0, abs=1e-9)
    assert summary["ttft_s_mean_err_pct"] == pytest.approx(100 * (1 / 1.1 - 1), rel=1e-6)


def synthetic_e2e_run(path, iterations: int = 12, speed_factor: float = 1.0):
    """A +exp=e2e run directory of tiny-mixtral on cpu-emulated with known per-layer times: t_main 2 ms, expert
    compute 0.4 ms, hidden-vector hop 1 ms, worker step 3 ms; layer 0 of every iteration is loaded after routing
    (stall = an 8 ms copy), every other layer from a right prediction; an LM-head tail of 1.5 ms. The measured
    decode is what those times add up to, divided by ``speed_factor`` in decode tok/s. The fully cached
    model's record and speed agree exactly."""
    path.mkdir(parents=True)
    config = {
        "exp": {"name": "e2e", "hardware": "cpu-emulated", "overrides": {}, "systems": ["cached", "odmoe"]},
        "hardware": {"name": "host", "emulated": False, "source": "this machine"},
        "model": {"name": "tiny-mixtral", "dtype": "float32", "path": None},
        "system": {
            "name": "odmoe",
            "workers": 8,
            "group_size": None,
            "slots": None,
            "expert_dtype": "fp32",
            "prefill_minibatches": 4,
            "shadow": {
                "predictor": "sep",
                "precision": "fp16",
                "alignment": "T1_KV1",
                "departure": "aligned",
            },
        },
    }
    meta = {"config": config, "hardware": {"profile": "cpu-emulated", "emulated": True, "requested": "host"}}
    (path / "meta.json").write_text(json.dumps(meta))
    rows = []
    for n in range(1, iterations + 1):
        for layer in range(16):
            late = layer == 0
            stall = 0.008 if late else 0.0
            rows.append(
                {
                    "system": "odmoe",
                    "n": n,
                    "layer": layer,
                    "t_main": 0.002,
                    "t_worker": 0.003 + stall,
                    "stall": stall,
                    "compute": 0.0004,
                    "net_in": 0.001,
                    "net_in_transport": 0.0006,
                    "predicted": int(not late),
                    "mispredicted": 0,
                    "loaded_from_prediction": 0 if late else 2,
                    "reloads": 0,
                    "hits": 0 if late else 2,
                    "request": "p0",
                    "job": 0,
                }
            )
    layers = pd.DataFrame(rows)
    layers.to_csv(path / "layers.csv", index=False)
    out_len = iterations + 1
    bound = float((layers.t_main + layers.t_worker - layers.stall).sum()) + 0.0015 * iterations
    decode = bound + float(layers.stall.sum())
    # the fully cached model's record (odmoe.record): 2 ms to each router, 0.8 ms of experts, 1.5 ms tail
    record = ExecutorRecord()
    for _ in range(out_len):
        for layer in range(16):
            record.layer(
                layer=layer,
                t_main=0.002,
                t_plan=0.0,
                t_demand=0.0,
                t_prefetch=0.0,
                t_experts=0.0008,
                computed=2,
                demand=[],
                prefetch=[],
                deferred=[],
                deferred_after=[],
                waits=[],
            )
        record.end_step(0.0015, 0.0)
    save_records([("p0", record)], path / "records" / "runtime" / f"cached-16x{out_len}")
    c_ttft = c_dec = 16 * 0.0028 + 0.0015
    c_dec *= iterations
    pd.DataFrame(
        [
            {
                "system": "odmoe",
                "workload": f"16x{out_len}",
                "prompt_id": "p0",
                "prompt_len": 16,
                "output_len": out_len,
                "ttft_s": 0.2,
                "decode_s": decode,
                "decode_tok_s": speed_factor * (out_len - 1) / decode,
                "output_tok_s": out_len / (0.2 + decode),
                "lower_bound_s": bound,
                "stall_s": float(layers.stall.sum()),
            },
            {
                "system": "cached",
                "workload": f"16x{out_len}",
                "prompt_id": "p0",
                "prompt_len": 16,
                "output_len": out_len,
                "ttft_s": c_ttft,
                "decode_s": c_dec,
                "decode_tok_s": (out_len - 1) / c_dec,
                "output_tok_s": out_len / (c_ttft + c_dec),
                "lower_bound_s": np.nan,
                "stall_s": np.nan,
            },
        ]
    ).to_csv(path / "requests.csv", index=False)
    return path


def test_sim_measured_derives_its_inputs_from_an_e2e_run(tmp_path):
    from experiments import sim_measured as sm
    from odmoe.costs import Formats

    path = synthetic_e2e_run(tmp_path / "run")
    m = sm.load_run(path)
    assert m.shape.name == "tiny-mixtral" and m.hardware.name == "cpu-emulated"
    assert (m.odmoe.num_workers, m.odmoe.token_period, m.odmoe.kv_period, m.odmoe.prefill_overlap) == (
        8,
        1,
        1,
        True,
    )
    assert m.formats.shadow == "fp16"
    (r, seg), *rest = sm.split_requests(m.layers, m.requests)
    assert not rest and len(seg) == 12 * 16
    base = ModelCosts(m.shape, m.hardware, Formats())
    x = sm.derive_inputs(seg, r, m.shape, m.odmoe, base)
    wire = base.wire(base.act_bytes(1))
    t = x.table.set_index("layer")
    assert t.loc[3, "main_s"] == pytest.approx(0.002) and t.loc[3, "expert_s"] == pytest.approx(0.0004)
    assert t.loc[-1, "main_s"] == pytest.approx(0.0015)  # the LM-head tail
    assert t.loc[3, "hop_in_s"] == pytest.approx(0.001 - wire) and x.latency == pytest.approx(0.001 - wire)
    # zero-stall worker step 3 ms = hop in + compute + hop out + 3 serializations (2 workers, 1 expert each)
    assert t.loc[3, "hop_out_s"] == pytest.approx(0.003 - 0.001 - 0.0004 - 2 * wire)
    assert t.loc[3, "shadow_s"] == pytest.approx(0.002 + 2 * 0.0004)
    # the copy time is the stall of the layers loaded after routing
    assert x.load_measured and x.load_s == pytest.approx(0.008)
    assert x.message_s == pytest.approx(0.0006)  # the real transport of a message (prefill queues behind it)
    assert (x.timely[:, 0] == 0).all() and (x.timely[:, 1:] == 2).all() and (x.hits == x.timely).all()


def test_sim_measured_reproduces_a_consistent_run_and_flags_a_wrong_speed(tmp_path):
    summary, run = run_exp(
        "sim_measured", tmp_path / "ok", f"exp.e2e_run={synthetic_e2e_run(tmp_path / 'a')}"
    )
    table = pd.read_csv(run.path("measured_vs_sim.csv"))
    assert set(table.columns) >= {"system", "workload", "metric", "measured", "sim", "err_pct"}
    assert set(table.system) == {"odmoe", "cached_runtime"}
    odmoe = table[table.system == "odmoe"].set_index("metric")
    # the simulator puts the measured pieces back together: the same stalls (one 8 ms copy per token) and speed
    assert summary["odmoe_stall_s_sim"] == pytest.approx(summary["odmoe_stall_s_measured"], rel=0.01)
    assert abs(odmoe.loc["decode_tok_s", "err_pct"]) < 0.5
    assert summary["cached_runtime_max_abs_err_pct"] == pytest.approx(0.0, abs=1e-9)
    # a run measured at half the speed its own per-layer times give cannot agree
    summary, run = run_exp(
        "sim_measured", tmp_path / "bad", f"exp.e2e_run={synthetic_e2e_run(tmp_path / 'b', speed_factor=0.5)}"
    )
    assert summary["odmoe_decode_tok_s_max_abs_err_pct"] > 90 and summary["within_15pct"] is False
    bad = tmp_path / "b" / "layers.csv"
    pd.read_csv(bad).drop(columns=["net_in"]).to_csv(bad, index=False)
    with pytest.raises(OdmoeError, match="missing column.*net_in"):
        run_exp("sim_measured", tmp_path / "c", f"exp.e2e_run={tmp_path / 'b'}")


@pytest.fixture(scope="module")
def testbed():
    shape = load_shape("mixtral-8x7b")
    return shape, ModelCosts(shape, load_profile("rtx3090-testbed"))


def test_table2_speed_within_15_percent(testbed):
    shape, costs = testbed
    for P, N in ((16, 256), (128, 64)):
        r = simulate_request(
            shape, costs, ODMoEConfig(), P, N, rc.from_recall(RECALL["T1_KV1_int8"][0], N - 1, 32, 2, 0)
        )
        paper = TABLE2["odmoe"]
        assert r.decode_tok_s == pytest.approx(paper["decode_tok_s"][(P, N)], rel=0.15)
        assert r.ttft * 1e3 == pytest.approx(paper["ttft_ms"][(P, N)], rel=0.15)
        assert r.output_tok_s == pytest.approx(paper["output_tok_s"][(P, N)], rel=0.15)


def test_fig8_predicted_cases_within_15_percent_and_ordered(testbed):
    shape, costs = testbed
    cases = {
        1: (ODMoEConfig(), rc.from_recall(RECALL["T1_KV1_int8"][0], 255, 32, 2, 0)),
        4: (
            ODMoEConfig(token_period=0, kv_period=0),
            rc.from_recall(RECALL["unaligned_int8"][0], 255, 32, 2, 0),
        ),
        5: (ODMoEConfig(predictor="ahead"), rc.random_prefetch(8, 2, 255, 32, 0)),
        6: (ODMoEConfig(predictor="none"), rc.perfect(255, 32, 2)),
    }
    speeds = {
        c: 255 / simulate_decode(shape, costs, cfg, hits, ctx0=16).time for c, (cfg, hits) in cases.items()
    }
    for case, speed in speeds.items():
        assert speed == pytest.approx(FIG8[case][1], rel=0.15)
    assert sorted(speeds, key=speeds.get, reverse=True) == [1, 4, 5, 6]


def test_runner_composes_the_testbed_for_sim(tmp_path):
    with initialize_config_dir(config_dir=str(repo_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+exp=sim_paper"])
        assert cfg.hardware.name == "rtx3090-testbed"
        cfg = compose(config_name="config", overrides=["+exp=sim", "hardware=rtx3080-workers"])
        assert cfg.hardware.worker.name == "RTX 3080" and cfg.hardware.num_workers == 8


def test_fig8_reads_measured_recall_from_one_or_several_tables(tmp_path):
    from experiments.sim_paper import _measured_recall

    cols = ["precision", "alignment", "recall"]
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    pd.DataFrame(
        [["int8", "token_kv", 0.99], ["int8", "none", 0.4], ["nf4", "kv", 0.1]], columns=cols
    ).to_csv(a)
    pd.DataFrame([["int8", "kv", 0.6]], columns=cols).to_csv(b)
    assert _measured_recall(str(a)) == {1: 0.99, 4: 0.4}  # nf4 rows ignored: Fig. 8 is the int8 shadow
    assert _measured_recall([str(a), str(b)]) == {1: 0.99, 3: 0.6, 4: 0.4}
    assert _measured_recall(None) == {}
