"""``+exp=predictors`` end to end on the micro model (tiny sizes): tables, figures, checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd


def test_predictors_experiment_writes_tables_and_figures(tmp_path, micro_mixtral_dir, odmoe_home):
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        f"results_dir={tmp_path}",
        "+exp=predictors",
        "model=micro-mixtral",
        "threads=1",
        "exp.eval_prompts=1",
        "exp.calib_prompts=2",
        "exp.prompt_len=8",
        "exp.output_len=4",
        "exp.max_lookahead=3",
        "exp.sep_precisions=[fp16]",
        "exp.learned.steps=5",
        "exp.preattn.steps=5",
        "exp.moe_beyond.steps=5",
        "exp.cache.capacities=[2,8]",
        "exp.proc_workers=1",
    ]
    env = dict(os.environ, ODMOE_HOME=str(odmoe_home))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    run_dir = tmp_path / "predictors" / "default"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["check_oracle_recall_1"] and summary["check_load_after_routing_0"]
    assert summary["lookahead_G_minus_1"] == 3 and summary["prompts_disjoint"]
    rec = pd.read_csv(run_dir / "recall_by_d.csv")
    assert set(rec["d"]) == {0, 1, 2, 3} and "sep_fp16" in set(rec["predictor"])
    assert set(rec[rec.d == 0].predictor) == {"preattn", "moe_beyond"}  # the same-layer design points
    new = rec[rec.predictor.isin(["fate", "preattn", "moe_beyond"]) & (rec.d >= 1)]
    assert len(new) == 9 and new.recall.between(0, 1).all()  # every new family at every lookahead
    cost = pd.read_csv(run_dir / "training_cost.csv").set_index("predictor")
    assert cost.loc["preattn", "train_steps"] == 5 and cost.loc["moe_beyond", "parameters"] > 0
    assert summary["ranking_d1"].startswith("oracle 1.0000")
    t1 = pd.read_csv(run_dir / "table1.csv")
    assert {"recall_d1", "recall_d3", "QUOTED_value"} <= set(t1.columns)
    assert t1.set_index("system").loc["HOBBIT", "QUOTED_value"] == "0.91"
    hits = pd.read_csv(run_dir / "cache_hits.csv")
    assert set(hits["policy"]) == {"lru", "lfu", "activation"}
    # a full cache (E experts per layer) misses only on first use, so it beats the smallest one
    lru = hits[(hits["policy"] == "lru") & (hits["prefetch"] == "none")].set_index("capacity")["hit_rate"]
    assert lru[8] > lru[2]
    assert (run_dir / "recall_vs_d.png").stat().st_size > 0 and (run_dir / "cache_hit_vs_size.png").exists()
