"""Plugins (issue 16, docs/extending.md): the documented example runs through configuration alone, and bad
plugin input is one clear error naming the plugin."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from odmoe.errors import OdmoeError
from odmoe.paths import repo_root
from odmoe.predict.harness import Capture, predictions
from odmoe.predict.predictors import build_plugin_predictors
from odmoe.trace import Trace

BAD = """
import numpy as np
from odmoe.predict.harness import Predictor

class NotAPredictor:
    def predict(self, view, d_max):
        return np.zeros((d_max, view.top_k), dtype=np.int64)

class NoPredict(Predictor):
    pass

class WrongShape(Predictor):
    name = "wrong_shape"
    def predict(self, view, d_max):
        return np.zeros(view.top_k, dtype=np.int64)

class OutOfRange(Predictor):
    name = "out_of_range"
    def predict(self, view, d_max):
        return np.full((d_max, view.top_k), view.num_experts, dtype=np.int64)
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    """The example module of docs/extending.md (its first python block, verbatim) and a module of bad plugins,
    importable from this process and from the subprocesses (PYTHONPATH)."""
    d = tmp_path_factory.mktemp("plugins")
    doc = (repo_root() / "docs" / "extending.md").read_text()
    (block,) = re.findall(r"```python\n# odmoe_example_plugins.py\n(.*?)```", doc, re.S)
    (d / "odmoe_example_plugins.py").write_text(block)
    (d / "odmoe_bad_plugins.py").write_text(BAD)
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))


def _run(args: list[str], plugin_dir: Path, odmoe_home: Path, timeout: int = 300):
    env = dict(os.environ, ODMOE_HOME=str(odmoe_home), PYTHONPATH=str(plugin_dir))
    cmd = [sys.executable, "-m", "experiments.run", *args]
    return subprocess.run(cmd, cwd=repo_root(), capture_output=True, text=True, env=env, timeout=timeout)


def test_documented_predictor_runs_through_configuration(tmp_path, plugin_dir, micro_mixtral_dir, odmoe_home):
    res = _run(
        [
            f"results_dir={tmp_path}",
            "+exp=predictors",
            "model=micro-mixtral",
            "threads=1",
            "exp.eval_prompts=1",
            "exp.calib_prompts=2",
            "exp.prompt_len=8",
            "exp.output_len=4",
            "exp.max_lookahead=3",
            "exp.predictors=[gate_h]",
            "exp.sep_precisions=[]",
            "exp.extra_predictors=[{_target_: odmoe_example_plugins.RecentExperts, window: 2}]",
            "exp.cache.capacities=[2]",
            "exp.cache.pairs.lru=[none,recent_experts]",
            "exp.cache.pairs.lfu=[none]",
            "exp.cache.pairs.activation=[none]",
            "exp.proc_workers=1",
        ],
        plugin_dir,
        odmoe_home,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "predictors" / "default"
    rec = pd.read_csv(run / "recall_by_d.csv")
    mine = rec[rec.predictor == "recent_experts"]
    assert set(mine.d) == {1, 2, 3} and mine.recall.between(0, 1).all() and (mine.slots > 0).all()
    t1 = pd.read_csv(run / "table1.csv").set_index("predictor")
    assert t1.loc["recent_experts", "system"] == "plugin recent_experts"
    hits = pd.read_csv(run / "cache_hits.csv")
    assert "recent_experts" in set(hits.prefetch)  # a plugin prefetches in the cache comparison too
    summary = json.loads((run / "summary.json").read_text())
    assert "recall_d1_recent_experts" in summary


def test_documented_policy_runs_through_configuration(tmp_path, plugin_dir, micro_mixtral_dir, odmoe_home):
    res = _run(
        [
            "+exp=e2e",
            "system=custom",
            "system.policy._target_=odmoe_example_plugins.LayerLRU",
            "+system.policy.experts_per_layer=2",
            "model=micro-mixtral",
            "exp.systems=[cached]",
            "exp.workloads=[[8,6]]",
            "exp.num_prompts=1",
            "exp.ppl_tokens=8",
            f"results_dir={tmp_path}",
            "run=t",
        ],
        plugin_dir,
        odmoe_home,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "e2e" / "t"
    t2 = pd.read_csv(run / "table2.csv").set_index("system")
    assert {"cached", "custom"} <= set(t2.index)
    row = t2.loc["custom"]
    assert row.executor == "engine" and row.agreement == 1.0  # lossless: the fp32 reference's tokens
    assert 0 < row.hit_rate < 1 and row.loads > 0  # 2 of 8 experts per layer: it really offloads
    assert row.prefetches > 0  # the plugin's prefetch hook ran
    assert "custom" in (run / "table2.md").read_text()
    assert json.loads((run / "summary.json").read_text())["system"] == "custom"


def test_bad_plugin_is_one_clear_error_on_the_command_line(tmp_path, plugin_dir, odmoe_home):
    res = _run(
        [
            f"results_dir={tmp_path}",
            "+exp=predictors",
            "model=micro-mixtral",
            "exp.extra_predictors=[{_target_: no_such_module.Predictor}]",
        ],
        plugin_dir,
        odmoe_home,
        timeout=120,
    )
    assert res.returncode == 2
    lines = [x for x in res.stderr.splitlines() if x.startswith("odmoe: error:")]
    assert len(lines) == 1 and "exp.extra_predictors[0]" in lines[0] and "no_such_module" in lines[0]
    assert "PYTHONPATH" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "predictors" / "default" / "summary.json").exists()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module.X", "cannot import module 'no_such_module'"),
        ("odmoe_bad_plugins.Missing", "has no 'Missing'"),
        ("odmoe_bad_plugins.NotAPredictor", "is not a odmoe.predict.harness.Predictor"),
        ("odmoe_bad_plugins.NoPredict", "does not implement predict"),
    ],
)
def test_bad_predictor_classes_are_refused(plugin_dir, target, message):
    with pytest.raises(OdmoeError, match=re.escape(message)) as err:
        build_plugin_predictors([{"_target_": target}])
    assert "exp.extra_predictors[0]" in str(err.value)


def test_bad_arguments_and_names_are_refused(plugin_dir):
    spec = {"_target_": "odmoe_example_plugins.RecentExperts"}
    with pytest.raises(OdmoeError, match="building odmoe_example_plugins.RecentExperts failed.*window2"):
        build_plugin_predictors([{**spec, "window2": 3}])
    with pytest.raises(OdmoeError, match="already in the run"):
        build_plugin_predictors([spec, spec])
    with pytest.raises(OdmoeError, match="already in the run"):
        build_plugin_predictors([{**spec, "name": "gate_h"}], taken=["gate_h"])
    (p,) = build_plugin_predictors([{**spec, "window": 3}])
    assert p.name == "recent_experts" and p.window == 3


def _synthetic_capture(out: int = 3, lm: int = 4, e: int = 8, k: int = 2, h: int = 6) -> Capture:
    rng = np.random.default_rng(0)
    routing = lambda n: np.stack([rng.permutation(e)[:k] for _ in range(n * lm)]).reshape(n, lm, k)  # noqa: E731
    trace = Trace("p0", np.arange(5), np.arange(out), tuple(range(lm)), routing(5), None, routing(out), None)

    def states(n: int) -> dict:
        return {t: rng.normal(size=(n, lm, h)) for t in ("x", "h", "u")} | {"p": rng.random((n, lm, e))}

    return Capture("p0", trace, rng.normal(size=h), states(5), states(out))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("odmoe_bad_plugins.WrongShape", r"'wrong_shape' \(odmoe_bad_plugins.WrongShape\) at \(n=1, j=0\) returned "
         r"an array of shape \(2,\)"),
        ("odmoe_bad_plugins.OutOfRange", r"'out_of_range' .* returned expert id 8, outside 0..7"),
    ],
)  # fmt: skip
def test_bad_predictions_name_the_plugin(plugin_dir, target, message):
    (p,) = build_plugin_predictors([{"_target_": target}])
    with pytest.raises(OdmoeError, match=message):
        predictions(p, _synthetic_capture(), 3)


def test_documented_predictor_predicts_valid_sets(plugin_dir):
    (p,) = build_plugin_predictors([{"_target_": "odmoe_example_plugins.RecentExperts"}])
    pr = predictions(p, _synthetic_capture(), 3)
    assert pr.shape == (3, 4, 3, 2) and pr.max() < 8
    assert (pr[:, :3, 0] >= 0).all()  # every existing target slot got k experts


def test_bad_policies_are_refused(plugin_dir):
    from baselines.measure import plugin_policy

    with pytest.raises(OdmoeError, match="is not a baselines.engine.Policy"):
        plugin_policy("mine", {"policy": {"_target_": "odmoe_bad_plugins.NotAPredictor"}})
    with pytest.raises(OdmoeError, match="system 'custom': system.policy.*has no _target_"):
        plugin_policy("custom", {"policy": {"_target_": None}})
    p = plugin_policy(
        "mine", {"policy": {"_target_": "odmoe_example_plugins.LayerLRU", "experts_per_layer": 3}}
    )
    assert p.name == "mine" and p.experts_per_layer == 3
