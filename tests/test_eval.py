"""The lm-evaluation-harness backend and ``+exp=quality`` on the micro model.

One OD-MoE cluster launch in all (the experiment test scores every request of its task in one launch).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from lm_eval.api.instance import Instance
from omegaconf import OmegaConf

from baselines import system_config
from odmoe.errors import OdmoeError
from odmoe.eval.backend import OdmoeLM
from odmoe.eval.executors import CachedExecutor, EngineExecutor
from odmoe.eval.harness import load_task, task_manager
from odmoe.eval.tasks.kjv import next_verse_documents, next_word_documents
from odmoe.hardware import load_profile
from odmoe.paths import repo_root
from odmoe.results import Run


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def teacher_forced(lm, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The model's own log p(continuation | context) from one forward pass over the whole sequence."""
    lm.adapter.clear_experts_forward()
    logits = lm.model(torch.tensor([context + continuation])).logits[0, len(context) - 1 : -1]
    logp = torch.log_softmax(logits.float(), -1)
    target = torch.tensor(continuation)
    return float(logp[torch.arange(len(target)), target].sum()), bool((logits.argmax(-1) == target).all())


def task_pairs(backend: OdmoeLM, docs: int) -> list[Instance]:
    """Every choice of the shipped task's first documents, as the harness asks for them."""
    return [
        request("loglikelihood", d["context"], " " + choice)
        for d in next_verse_documents()[:docs]
        for choice in d["choices"]
    ]


def test_cached_loglikelihoods_are_the_models_teacher_forced_logprobs(micro_mixtral):
    backend = OdmoeLM(CachedExecutor(micro_mixtral), micro_mixtral.tokenizer)
    tok = micro_mixtral.tokenizer
    cases = [
        ("And God said unto Abraham,", " Thou shalt keep my covenant"),
        (
            "In the beginning ",
            "God created the heaven",
        ),  # the context's trailing space moves to the continuation
        ("", "And the earth was without form"),  # empty context: the EOS token conditions
    ]
    got = backend.loglikelihood([request("loglikelihood", c, x) for c, x in cases])
    for (context, continuation), (logprob, greedy) in zip(cases, got, strict=True):
        ctx = tok.encode(context.rstrip()) if context else [tok.eos_token_id]
        whole = tok.encode(context + continuation) if context else ctx + tok.encode(continuation)
        ref = teacher_forced(micro_mixtral, ctx, whole[len(ctx) :])
        assert abs(logprob - ref[0]) < 1e-4 and greedy == ref[1]
    # the model's own greedy continuation is reported as greedy (the fixture decodes plainly greedily)
    ctx = tok.encode("And God said unto Abraham,")
    plain = backend.executor.generate([ctx], 4)[0]
    [(logprob, greedy)] = backend._loglikelihood_tokens([(None, ctx, plain)])
    assert greedy and abs(logprob - teacher_forced(micro_mixtral, ctx, plain)[0]) < 1e-4
    # rolling loglikelihood of a short text: every token given the EOS prefix
    text = "And the LORD spake unto Moses, saying,"
    [rolling] = backend.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    ref, _ = teacher_forced(micro_mixtral, [tok.eos_token_id], tok.encode(text))
    assert abs(rolling - ref) < 1e-4


def test_generate_until_cuts_at_the_first_stop_sequence(micro_mixtral):
    backend = OdmoeLM(CachedExecutor(micro_mixtral), micro_mixtral.tokenizer)
    prompt = "And it came to pass"
    [full] = backend.generate_until([request("generate_until", prompt, {"until": [], "max_gen_toks": 12})])
    words = full.split()
    assert len(words) >= 3
    stop = " " + words[2]
    [cut] = backend.generate_until([request("generate_until", prompt, {"until": [stop], "max_gen_toks": 12})])
    assert cut == full.split(stop, 1)[0] and len(cut) < len(full)
    with pytest.raises(OdmoeError, match="greedily"):
        backend.generate_until([request("generate_until", prompt, {"do_sample": True})])


@pytest.mark.parametrize(
    "name, off, on",
    [
        (
            "mixtral_offloading",
            {"quantize": "none", "attention": "none"},
            {"quantize": "hqq2", "attention": "none"},
        ),
        (
            "adapmoe",
            {"quantize": "none", "attention": "none", "sensitivity_budget": 0.0},
            {"quantize": "none", "attention": "none"},
        ),
        ("hobbit", {"t1": 2.0, "t2": 2.0}, {}),  # mixed precision and skipping on a miss
    ],
)
def test_a_lossy_mechanism_changes_scores_only_when_on(micro_mixtral, name, off, on):
    hardware = load_profile("cpu-emulated")
    cached = OdmoeLM(CachedExecutor(micro_mixtral), micro_mixtral.tokenizer)
    requests = task_pairs(cached, docs=2)
    ref = np.array([lp for lp, _ in cached.loglikelihood(requests)])
    scores = {}
    for label, overrides in (("off", off), ("on", on)):
        executor = EngineExecutor(name, system_config(name, overrides), micro_mixtral, hardware)
        try:
            assert executor.lossy == (label == "on")
            got = OdmoeLM(executor, micro_mixtral.tokenizer).loglikelihood(requests)
            scores[label] = np.array([lp for lp, _ in got])
        finally:
            executor.close()
    assert np.abs(scores["off"] - ref).max() < 1e-4
    assert np.abs(scores["on"] - ref).max() > 1e-3


def test_missing_task_data_is_one_clear_error(tmp_path):
    (tmp_path / "needs_hub.yaml").write_text(
        "task: needs_hub_data\ndataset_path: odmoe-tests/not-a-cached-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: label\n"
    )
    tm = task_manager(["needs_hub_data"], [tmp_path])
    with pytest.raises(
        OdmoeError, match=r"task needs_hub_data: its data \(odmoe-tests/not-a-cached-dataset\)"
    ):
        load_task(tm, "needs_hub_data")
    with pytest.raises(OdmoeError, match="unknown lm-eval task"):
        task_manager(["kjv_next_versee"], [tmp_path], defaults=False)
    shipped = load_task(task_manager(["kjv_next_verse", "kjv_next_word"]), "kjv_next_word")["tasks"]
    assert len(shipped["kjv_next_word"].dataset["test"]) == len(next_word_documents()) == 60


def quality(tmp_path, *overrides: str) -> tuple[dict, Run]:
    with initialize_config_dir(config_dir=str(repo_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+exp=quality", "model=micro-mixtral", *overrides])
    run = Run(tmp_path, "quality", OmegaConf.to_container(cfg, resolve=True))
    summary = importlib.import_module("experiments.quality").run(cfg, run)
    return run.finish(summary), run


def loglikelihoods(run: Run, system: str) -> np.ndarray:
    path = run.path("lm_eval") / system / "kjv_next_word.samples.jsonl"
    rows = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["doc_id"])
    return np.array([[choice[0] for choice in r["filtered_resps"]] for r in rows])


def test_quality_experiment_lossless_systems_score_identically(tmp_path, micro_mixtral_dir):
    args = (
        "exp.systems=[cached,odmoe,moe_infinity,mixtral_offloading]",
        "exp.tasks=[kjv_next_word]",
        "exp.limit=5",
        "+exp.overrides.odmoe.workers=4",
        "+exp.overrides.odmoe.timeout_s=60",
    )
    summary, run = quality(tmp_path / "q", *args)
    table = run.table("quality", ["system", "task"]).frame().set_index("system")
    assert summary["lossless_systems_agree"] is True
    assert list(table.lossy) == [False, False, False, True]
    assert (table.samples == 5).all() and table.value.between(0, 1).all()
    ref = loglikelihoods(run, "cached")
    assert ref.shape == (5, 4)
    for system in ("odmoe", "moe_infinity"):  # the runtime and an fp32 engine policy: the same answers
        assert np.abs(loglikelihoods(run, system) - ref).max() < 1e-4
    assert np.abs(loglikelihoods(run, "mixtral_offloading") - ref).max() > 1e-3  # NF4 experts
    assert summary["odmoe_kjv_next_word_max_loglik_diff"] < 1e-4
    assert summary["mixtral_offloading_kjv_next_word_max_loglik_diff"] > 1e-3
    md = run.path("quality.md").read_text()
    assert "| kjv_next_word | acc,none |" in md and "MT-Bench-101" in md
    # resumable per (system, task): a rerun computes nothing (no cluster is started)
    (run.path("cluster-odmoe") / "requests.jsonl").unlink()
    again, _ = quality(tmp_path / "q", *args)
    assert not (run.path("cluster-odmoe") / "requests.jsonl").exists()
    assert again["cached_kjv_next_word"] == summary["cached_kjv_next_word"]


def test_lm_eval_command_line_runs_the_backend(tmp_path, micro_mixtral_dir, odmoe_home):
    env = dict(os.environ, ODMOE_HOME=str(odmoe_home), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    cmd = [
        sys.executable,
        "-m",
        "odmoe.eval",
        "run",
        "--model",
        "odmoe",
        "--model_args",
        "system=hobbit,model=micro-mixtral,system.t1=2.0,system.t2=2.0",
        "--device",
        "cpu",
        "--tasks",
        "kjv_next_word",
        "--limit",
        "2",
        "--output_path",
        str(tmp_path),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=repo_root())
    assert res.returncode == 0, res.stderr[-2000:]
    [path] = tmp_path.rglob("results_*.json")
    out = json.loads(path.read_text())
    assert 0 <= out["results"]["kjv_next_word"]["acc,none"] <= 1
    assert out["config"]["odmoe_system"] == "hobbit" and out["config"]["odmoe_lossy"] is False
