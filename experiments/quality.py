"""``+exp=quality``: the quality half of Table 2 — every system on lm-evaluation-harness tasks::

    python -m experiments.run +exp=quality                                   # embedded model, shipped task
    python -m experiments.run +exp=quality model=local model.path=/models/Mixtral-8x7B-v0.1 device=cuda \\
        'exp.tasks=[hellaswag,mmlu,arc_challenge,gsm8k,winogrande,bbh,humaneval,truthfulqa_mc2]'

Each system answers through the ``odmoe`` harness backend (``odmoe.eval``): the fully cached model in this
process, OD-MoE on its multi-process runtime (one cluster launch per task), every offloading baseline on the
offload engine with its lossy mechanisms on. Tasks load offline (the local Hugging Face cache, the shipped
tasks, or task YAMLs under ``exp.include_path``); a task whose data is missing stops the run before any
system starts, with one error naming it.

Outputs: ``quality.csv`` (one row per (system, task): the headline metric, its standard error, every metric
as JSON; resumable: a rerun skips finished pairs), ``quality.md`` (tasks x systems beside the paper's
numbers, ``odmoe.eval.paper``; then each system's largest log-likelihood difference from the fully cached
model and how often it picks the same choice, also in ``versus_cached.csv``), ``lm_eval/<system>/<task>.json`` (lm-eval's results) and, with
``exp.log_samples``, ``lm_eval/<system>/<task>.samples.jsonl`` (every document's requests and answers).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping

import pandas as pd
import torch
from omegaconf import OmegaConf

from odmoe.errors import OdmoeError
from odmoe.eval import paper
from odmoe.eval.executors import SYSTEMS, make_executor
from odmoe.eval.harness import load_task, offline, task_manager
from odmoe.models import load_from_cfg
from odmoe.paths import repo_root
from odmoe.results import Run

log = logging.getLogger("odmoe")

COLUMNS = "system task benchmark metric value stderr samples lossy expert_format wall_s metrics".split()


def _system_cfg(cfg, name: str) -> dict:
    """``conf/system/<name>.yaml`` with ``exp.overrides[name]`` applied."""
    base = OmegaConf.load(repo_root() / f"conf/system/{name}.yaml")
    extra = (cfg.exp.get("overrides") or {}).get(name) or {}
    return OmegaConf.to_container(OmegaConf.merge(base, extra), resolve=True)


def headline(results: Mapping, task: str) -> tuple[str, float, float, dict]:
    """(metric key, value, stderr, every numeric metric) of ``task`` in lm-eval's ``results``."""
    res = results["results"].get(task)
    if res is None:
        raise OdmoeError(f"lm-eval returned no results for task {task}")
    metrics = {  # lm-eval's "metric,filter" keys (not sample_len, alias, ...)
        k: v for k, v in res.items() if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    key = paper.TASKS.get(task, (None, None))[1]
    if key not in metrics:  # not a known task: its first metric
        key = next((k for k in metrics if "_stderr" not in k), None)
    if key is None:
        raise OdmoeError(f"task {task} reported no metric")
    name, _, filt = key.partition(",")
    stderr = metrics.get(f"{name}_stderr,{filt}", math.nan)
    return key, float(metrics[key]), float(stderr) if stderr != "N/A" else math.nan, metrics


def _evaluate(olm, task: str, tm, e, out_dir) -> tuple[dict, int]:
    import lm_eval

    with offline():
        res = lm_eval.simple_evaluate(
            model=olm,
            tasks=[task],
            task_manager=tm,
            num_fewshot=e.num_fewshot,
            limit=e.limit,
            bootstrap_iters=int(e.bootstrap_iters),
            log_samples=bool(e.log_samples),
            confirm_run_unsafe_code=bool(e.confirm_run_unsafe_code),
            random_seed=int(e.seed),
            numpy_random_seed=int(e.seed),
            torch_random_seed=int(e.seed),
            fewshot_random_seed=int(e.seed),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = res.pop("samples", None) or {}
    n = sum(int(v.get("effective", v.get("original", 0))) for v in res.get("n-samples", {}).values())
    (out_dir / f"{task}.json").write_text(json.dumps(res, indent=2, default=str))
    if samples:
        with (out_dir / f"{task}.samples.jsonl").open("w") as f:
            for sub, docs in samples.items():
                for s in docs:
                    f.write(json.dumps({"task": sub, **s}, default=str) + "\n")
    return res, n


def run(cfg, run: Run) -> dict:
    e = cfg.exp
    torch.set_num_threads(int(e.threads))
    systems = [str(s) for s in e.systems]
    tasks = [str(t) for t in e.tasks]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems or not tasks:
        raise OdmoeError(
            f"exp.systems={systems} and exp.tasks={tasks} must be non-empty lists; systems from {', '.join(SYSTEMS)}"
        )
    tm = task_manager(tasks, list(e.include_path or []))
    for task in tasks:  # every task's data before any system runs
        load_task(tm, task)
    lm = load_from_cfg(cfg)
    run.bind_model(lm.name, lm.fingerprint)
    table = run.table("quality", key=["system", "task"])
    from odmoe.eval.backend import OdmoeLM

    for system in systems:
        todo = [t for t in tasks if not table.done(system=system, task=t)]
        if not todo:
            continue
        executor = make_executor(
            system,
            cfg,
            _system_cfg(cfg, system),
            lm,
            run.path(f"cluster-{system}"),
            float(e.max_logit_mb) * 1e6,
        )
        olm = OdmoeLM(executor, lm.tokenizer, int(e.max_gen_toks))
        try:
            for task in todo:
                t0 = time.perf_counter()
                res, n = _evaluate(olm, task, tm, e, run.path("lm_eval") / system)
                key, value, stderr, metrics = headline(res, task)
                info = executor.info()
                table.add(
                    {
                        "system": system,
                        "task": task,
                        "benchmark": paper.TASKS.get(task, (None,))[0] or "",
                        "metric": key,
                        "value": value,
                        "stderr": stderr,
                        "samples": n,
                        "lossy": info["lossy"],
                        "expert_format": info.get("expert_format", "fp32"),
                        "wall_s": round(time.perf_counter() - t0, 2),
                        "metrics": json.dumps(metrics, sort_keys=True),
                    }
                )
                log.info("%s on %s: %s = %.4f (%d samples)", system, task, key, value, n)
        finally:
            olm.close()
    frame = table.frame()
    versus = against_cached(run, systems, tasks) if e.log_samples and "cached" in systems else pd.DataFrame()
    versus.to_csv(run.path("versus_cached.csv"), index=False)
    run.path("quality.md").write_text(markdown(frame, systems, tasks, _note(lm.name, e), versus))
    return summarize(frame, systems, tasks, versus) | {"model": lm.name}


def _loglikelihoods(run: Run, system: str, task: str) -> dict[tuple[str, int], list[float]]:
    """(subtask, document) -> the log-likelihood of each choice, from the samples file."""
    out = {}
    path = run.path("lm_eval") / system / f"{task}.samples.jsonl"
    for line in path.read_text().splitlines():
        r = json.loads(line)
        resps = r["filtered_resps"]
        if resps and isinstance(resps[0], (list, tuple)):  # loglikelihood requests: (logprob, is_greedy)
            out[(r["task"], int(r["doc_id"]))] = [float(x[0]) for x in resps]
    return out


def against_cached(run: Run, systems: list[str], tasks: list[str]) -> pd.DataFrame:
    """Per (system, task): the largest |log-likelihood difference| from the fully cached model over every
    scored choice, and the share of documents where the system picks the cached model's choice."""
    rows = []
    for task in tasks:
        if not (run.path("lm_eval") / "cached" / f"{task}.samples.jsonl").exists():
            continue
        ref = _loglikelihoods(run, "cached", task)
        if not ref:
            continue
        for system in systems:
            path = run.path("lm_eval") / system / f"{task}.samples.jsonl"
            if system == "cached" or not path.exists():
                continue
            got = _loglikelihoods(run, system, task)
            keys = [k for k in ref if k in got]
            diff = max(max(abs(a - b) for a, b in zip(ref[k], got[k], strict=True)) for k in keys)
            same = sum(
                int(
                    max(range(len(ref[k])), key=ref[k].__getitem__)
                    == max(range(len(got[k])), key=got[k].__getitem__)
                )
                for k in keys
            )
            rows.append(
                {
                    "system": system,
                    "task": task,
                    "documents": len(keys),
                    "max_abs_loglik_diff": diff,
                    "same_choice_share": same / len(keys),
                }
            )
    return pd.DataFrame(rows)


def _note(model: str, e) -> str:
    limit = "all documents" if e.limit is None else f"at most {e.limit} documents per task"
    return (
        f"Model {model}; {limit}; lm-evaluation-harness headline metric per task (in %); each cell is "
        "`measured (paper)`. Paper numbers are Mixtral-8x7B's (PAPER.md §9.8); the full-precision systems "
        "share one paper value."
    )


def markdown(
    frame: pd.DataFrame, systems: list[str], tasks: list[str], note: str, versus: pd.DataFrame | None = None
) -> str:
    """Tasks x systems, each cell 'measured (paper)' in percent; then each system against the cached model."""
    lines = [f"# Answer quality (Table 2, quality half)\n\n{note}\n"]
    lines.append("| task | metric | " + " | ".join(systems) + " |")
    lines.append("|---|---|" + "---|" * len(systems))
    for task in tasks:
        rows = frame[frame.task == task]
        metric = rows.metric.iloc[0] if len(rows) else ""
        cells = []
        for system in systems:
            r = rows[rows.system == system]
            measured = f"{100 * r.value.iloc[0]:.2f}" if len(r) else "—"
            ref = paper.paper_value(task, system)
            cells.append(measured if ref is None else f"{measured} ({ref:.2f})")
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    if versus is not None and len(versus):
        lines.append(
            "\nAgainst the fully cached model, over every scored choice: the largest |log-likelihood "
            "difference| and the share of documents answered with the same choice.\n"
        )
        lines.append("| task | system | max abs log-likelihood difference | same choice |")
        lines.append("|---|---|---|---|")
        for r in versus.itertuples():
            lines.append(
                f"| {r.task} | {r.system} | {r.max_abs_loglik_diff:.3g} | {100 * r.same_choice_share:.1f}% |"
            )
    missing = ", ".join(f"{b} ({why})" for b, why in paper.NOT_IN_LM_EVAL.items())
    lines.append(f"\nNot measurable through lm-eval: {missing}.\n")
    return "\n".join(lines)


def summarize(
    frame: pd.DataFrame, systems: list[str], tasks: list[str], versus: pd.DataFrame | None = None
) -> dict:
    """``<system>_<task>`` headline values (and largest log-likelihood difference from the cached model), and
    whether every lossless system scored the same on each task."""
    s: dict = {"systems": len(systems), "tasks": len(tasks)}
    for r in frame.itertuples():
        s[f"{r.system}_{r.task}"] = float(r.value)
    for r in (versus if versus is not None else pd.DataFrame()).itertuples():
        s[f"{r.system}_{r.task}_max_loglik_diff"] = float(r.max_abs_loglik_diff)
    lossless = frame[~frame.lossy.astype(bool)]
    if len(lossless):
        s["lossless_systems_agree"] = bool((lossless.groupby("task").value.nunique() == 1).all())
    return s
