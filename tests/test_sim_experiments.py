"""The simulator's experiments in-process (small settings), and its headline agreement with the paper."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from odmoe.errors import OdmoeError
from odmoe.hardware import load_profile
from odmoe.paths import repo_root
from odmoe.results import Run
from odmoe.sim import recall as rc
from odmoe.sim.costs import ModelCosts
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
    with pytest.raises(OdmoeError, match="cannot run yet"):
        run_exp("sim_measured", tmp_path / "a")
    shape = load_shape("tiny-mixtral")
    times = pd.DataFrame({"layer": range(16), "main_s": 0.001, "expert_s": 0.0012, "load_s": 0.006})
    times.to_csv(tmp_path / "times.csv", index=False)
    hits = rc.from_recall(0.9, 20, 16, 2, seed=0)
    pd.DataFrame(
        {"pos": np.repeat(np.arange(1, 21), 16), "layer": np.tile(np.arange(16), 20), "hits": hits.ravel()}
    ).to_csv(tmp_path / "trace.csv", index=False)
    from odmoe.sim.costs import load_measured

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
