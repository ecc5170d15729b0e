"""The Hydra runner end to end, in subprocesses: result layout, resume, multirun, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd


def run_exp(*args: str, results, env_home) -> subprocess.CompletedProcess:
    return subprocess.run(
        exp_command(*args, results=results), capture_output=True, text=True, env=_env(env_home), timeout=300
    )


def exp_command(*args: str, results) -> list[str]:
    flags = [a for a in args if a.startswith("-")]  # Hydra wants its flags before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    return [sys.executable, "-m", "experiments.run", *flags, f"results_dir={results}", *overrides]


def _env(home) -> dict:
    return dict(os.environ, ODMOE_HOME=str(home))


def test_reference_run_writes_self_describing_results_and_resumes(tmp_path, micro_mixtral_dir, odmoe_home):
    args = (
        "+exp=reference",
        "model=micro-mixtral",
        "exp.num_prompts=2",
        "exp.prompt_len=8",
        "exp.output_len=6",
    )
    first = run_exp(*args, results=tmp_path, env_home=odmoe_home)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "reference" / "default"
    summary = json.loads((run_dir / "summary.json").read_text())
    meta = json.loads((run_dir / "meta.json").read_text())
    assert summary["prompts"] == 2 and summary["hardware_emulated"] is False
    assert meta["status"] == "complete" and len(meta["git"]["commit"]) == 40
    assert meta["config"]["exp"]["output_len"] == 6 and meta["packages"]["torch"]
    assert meta["machine"]["cpu_count"] >= 1
    assert len(list((run_dir / "traces").glob("*.parquet"))) == 2
    rows = pd.read_csv(run_dir / "prompts.csv")

    again = run_exp(*args, results=tmp_path, env_home=odmoe_home)
    assert again.returncode == 0, again.stderr
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "prompts.csv"), rows)  # resumed: no row recomputed

    changed = run_exp(*args[:-1], "exp.output_len=7", results=tmp_path, env_home=odmoe_home)
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines()[-1].startswith("odmoe: error:")
    assert "different config" in changed.stderr


def test_multirun_sweep(tmp_path, micro_mixtral_dir, odmoe_home):
    res = run_exp(
        "-m",
        "+exp=reference",
        "model=micro-mixtral",
        "exp.num_prompts=1",
        "exp.prompt_len=8",
        "exp.output_len=3,4",
        results=tmp_path,
        env_home=odmoe_home,
    )
    assert res.returncode == 0, res.stderr
    summaries = sorted((tmp_path / "reference" / "default").glob("*/summary.json"))
    assert [json.loads(p.read_text())["output_len"] for p in summaries] == [3, 4]


def test_bad_input_gives_one_error_line_and_no_summary(
    tmp_path, micro_mixtral_dir, odmoe_home, run_side_by_side
):
    cases = {
        ("+exp=reference", "model=micro-mixtral", "exp.output_len=-1"): "must be positive",
        ("+exp=reference", "model=micro-mixtral", "exp.num_prompts=0"): "positive number of prompts",
        ("+exp=reference", "model=micro-mixtral", "exp.prompt_len=600"): "exceed the model's context",
        ("+exp=reference", "model=local", "model.path=/no/such/dir"): "does not exist",
        ("+exp=pretrain", "model=local", "model.path=/x"): "embedded models only",
        ("model=micro-mixtral",): "no experiment chosen",
    }
    cmds = [exp_command(*args, f"run=bad{i}", results=tmp_path) for i, args in enumerate(cases)]
    cmds.append(exp_command("+exp=no_such_experiment", results=tmp_path))
    *runs, unknown = run_side_by_side(cmds, env=_env(odmoe_home))
    for (args, message), res in zip(cases.items(), runs, strict=True):
        assert res.returncode == 2, (args, res.stderr)
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("odmoe: error:") and message in last, (args, last)
        assert "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("summary.json"))
    for meta in tmp_path.rglob("meta.json"):
        assert json.loads(meta.read_text())["status"] == "failed"
    assert unknown.returncode == 2 and "no experiment 'no_such_experiment'; choose one of" in unknown.stderr
