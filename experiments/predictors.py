"""``+exp=predictors``: every expert-activation predictor on one model, one prompt set, one metric.

1. Reference passes (``odmoe.predict.harness.capture_references``): calibration and evaluation
   prompts (disjoint, checked) are decoded once by the full model with every tap recorded, in
   batches; for the evaluation prompts each SEP shadow is replayed with token + KV alignment every
   iteration (one parallel pass per prompt, ``odmoe.predict.sep.replay``).
   Captures are saved under ``captures/`` so a rerun resumes.
2. Predictors (the built-in ones named in ``exp.predictors`` and users' plugins from
   ``exp.extra_predictors``, docs/extending.md) are fitted on the calibration captures only and
   evaluated on the evaluation ones: ``recall_prompts.csv`` (predictor, prompt, d; d = 0 for the
   same-layer design point of the families that have one) -> ``recall_by_d.csv`` (Eq. 3 recall, and
   the other papers' metrics from the same counts) and ``table1.csv``; ``training_cost.csv``.
3. Cache comparators replay the evaluation traces: ``cache_prompts.csv`` -> ``cache_hits.csv``.
4. Figures ``recall_vs_d.png`` and ``cache_hit_vs_size.png`` (``plots/predictors.py``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from odmoe import signals
from odmoe.data.prompts import embedded_prompts, load_prompts
from odmoe.errors import OdmoeError
from odmoe.metrics import label_metrics
from odmoe.models import load_from_cfg
from odmoe.predict.cache import POLICIES, eam_matches, simulate
from odmoe.predict.harness import Capture, capture_references, hits_by_d, predictions, same_layer_rows
from odmoe.predict.predictors import EAMPredictor, build_plugin_predictors, build_predictors
from odmoe.results import Run
from odmoe.trace import check_length
from plots.predictors import cache_hits, recall_vs_d

# OD-MoE Table 1 (PAPER.md §9.1): numbers QUOTED from other papers (other models, prompts, metrics).
# system -> (predictor measured here, how it is scored here, quoted value, quoted metric)
TABLE1 = [
    ("Mixtral-Offloading", "gate_h", "d=1", "~0.80", "cache-hit (from Fig. 2 of 2312.17238)"),
    ("AdapMoE", "gate_x", "d=1", "0.86", "recall"),
    ("DAOP", "gate_h", "d=1", "0.84", "recall"),
    ("HOBBIT", "gate_h", "avg d<=4", "0.91", "recall, avg over up to 4 layers ahead"),
    ("MoE-Infinity", "eam", "all", "", ""),
    ("fMoE", "fmoe", "all", "<0.85", "cache-hit (from Fig. 12 of 2502.05370)"),
    ("ProMoE-style", "learned", "all", "", "GoodPred only (not comparable)"),
    ("gate on raw u_l (ablation)", "gate_u", "all", "", ""),
    (
        "Fate",
        "fate",
        "d=1",
        "~0.97",
        "prefetch accuracy, Qwen1.5-MoE / DeepSeekMoE (top-5 prefetched for k=4)",
    ),
    (
        "Pre-attention (2511.10676)",
        "preattn",
        "d=0 exact",
        "0.9303 / 0.9469 / 0.9762",
        "exact match, same layer; DeepSeek-V2-Lite / Qwen3-30B / Phi-mini-MoE",
    ),
    (
        "MoE-Beyond",
        "moe_beyond",
        "d=0 label",
        "0.975 (F1 0.866)",
        "per-expert accuracy incl. true negatives, same layer; DeepSeek-V2-Lite",
    ),
    ("OD-MoE SEP fp16", "sep_fp16", "all", "0.9994", "recall"),
    ("OD-MoE SEP int8", "sep_int8", "all", "0.9734", "recall"),
    ("OD-MoE SEP nf4", "sep_nf4", "all", "0.9567", "recall"),
    ("Random prefetch", "random", "all", "~0.25", "recall"),
    ("Load-after-routing", "load_after_routing", "all", "0", "recall (by construction)"),
    ("Oracle", "oracle", "all", "", ""),
]
# systems whose cache the toolkit simulates: system -> (policy, prefetch)
TABLE1_CACHE = {
    "Mixtral-Offloading": ("lru", "gate_h"),
    "MoE-Infinity": ("activation", "eam"),
    "fMoE": ("lru", "fmoe"),
    "Fate": ("lru", "fate"),
    "Pre-attention (2511.10676)": ("lru", "preattn"),
    "MoE-Beyond": ("lru", "moe_beyond"),
}
# which measured column holds the quoted number's metric
COMPARE = {
    "d=1": "recall_d1",
    "avg d<=4": "recall_avg_d1_4",
    "d=0 exact": "exact_d0",
    "d=0 label": "label_acc_d0",
}


# ---------------------------------------------------------------------------------------------
# prompts and captures
# ---------------------------------------------------------------------------------------------
def split_prompts(cfg, tokenizer, prompt_len: int, n_eval: int, n_calib: int):
    """(eval, calib) prompt lists that share no prompt (id or tokens); a clear error otherwise."""
    if cfg.data.source == "embedded":
        evals = embedded_prompts(tokenizer, n_eval, prompt_len, "eval")
        calib = embedded_prompts(tokenizer, n_calib, prompt_len, "calib")
    else:  # one source without splits: the first n_eval prompts evaluate, the next n_calib calibrate
        both = load_prompts(cfg.data, tokenizer, prompt_len, n_eval + n_calib)
        evals, calib = both[:n_eval], both[n_eval:]
    check_disjoint(evals, calib)
    return evals, calib


def check_disjoint(evals, calib) -> None:
    ids = {p.id for p in evals} & {p.id for p in calib}
    toks = {tuple(p.token_ids) for p in evals} & {tuple(p.token_ids) for p in calib}
    if ids or toks:
        raise OdmoeError(
            f"{len(ids | toks)} prompt(s) are both calibration and evaluation prompts; "
            "use disjoint prompt sets (embedded: split=calib vs eval; other sources: distinct prompts)"
        )


_WORK: dict = {}


def _init_worker() -> None:
    torch.set_num_threads(1)


def _capture_group(group: list[tuple[str, str, tuple[int, ...], str]]) -> list[str]:
    """Reference passes of a group of prompts of one kind, as one batched decode (+ SEP replays for
    eval prompts, one parallel pass each); saves every capture and returns the paths."""
    from odmoe.predict.sep import Alignment, replay

    lm = _WORK["lm"]
    kind = group[0][0]
    t0 = time.perf_counter()
    pairs = [(pid, token_ids) for _, pid, token_ids, _ in group]
    done = capture_references(lm.model, lm.adapter, pairs, _WORK["output_len"])
    seconds = (time.perf_counter() - t0) / len(group)
    for capture, _ in done:
        capture.extra["seconds_reference"] = np.asarray(seconds)
    if kind == "eval":
        records = [record for _, record in done]
        for precision, shadow in _WORK["shadows"].items():
            t0 = time.perf_counter()
            ems, _ = replay(shadow, records, Alignment(1, 1))
            seconds = (time.perf_counter() - t0) / len(group)
            for (capture, _), em in zip(done, ems, strict=True):
                capture.extra[f"sep_{precision}"] = em.experts.astype(np.int64)
                capture.extra[f"seconds_sep_{precision}"] = np.asarray(seconds)
    return [str(capture.save(path)) for (capture, _), (_, _, _, path) in zip(done, group, strict=True)]


def captures(
    run: Run, lm, evals, calib, output_len: int, shadows: dict, workers, batch: int = 32
) -> tuple[list, list]:
    """Load or make every capture: the missing ones of each kind in batched groups of at most
    ``batch`` prompts, spread over forked CPU workers."""
    from tqdm import tqdm

    root = run.path("captures")
    need = {f"sep_{p}" for p in shadows}
    tasks, paths = {"eval": [], "calib": []}, {"eval": [], "calib": []}
    for kind, prompts in (("eval", evals), ("calib", calib)):
        for p in prompts:
            path = root / kind / f"{p.id}.npz"
            paths[kind].append(path)
            ok = False
            if path.exists():
                c = Capture.load(path)
                ok = c.output_len == output_len and tuple(c.trace.prompt) == tuple(p.token_ids)
                ok = ok and (kind == "calib" or need <= set(c.extra))
            if not ok:
                path.parent.mkdir(parents=True, exist_ok=True)
                tasks[kind].append((kind, p.id, tuple(p.token_ids), str(path)))
    device = next(lm.model.parameters()).device
    total = sum(len(t) for t in tasks.values())
    if workers in (None, "auto"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = cores if device.type == "cpu" else 1
    workers = max(1, min(int(workers), total)) if total and device.type == "cpu" else 1
    groups = [
        share[i : i + batch]
        for kind in ("eval", "calib")
        for share in (tasks[kind][w::workers] for w in range(workers))
        for i in range(0, len(share), batch)
    ]
    _WORK.update(lm=lm, shadows=shadows, output_len=output_len)
    try:
        bar = tqdm(total=total, desc=f"reference passes ({workers} worker(s))", leave=False)
        if workers == 1:
            for g in groups:
                _capture_group(g)
                bar.update(len(g))
        else:
            with mp.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
                for g, _ in zip(groups, pool.imap(_capture_group, groups), strict=True):
                    bar.update(len(g))
        bar.close()
    finally:
        _WORK.clear()
    return [Capture.load(p) for p in paths["eval"]], [Capture.load(p) for p in paths["calib"]]


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def recall_table(
    frame: pd.DataFrame, design: dict[str, int | None], k: int, num_experts: int
) -> pd.DataFrame:
    """Eq. 3 recall per (predictor, d), and from the same counts the metrics other papers quote."""
    cols = ["hits", "slots", "predicted", "exact"]
    sums = frame.groupby(["predictor", "d"], sort=False)[cols].sum().reset_index()
    sums["recall"] = sums["hits"] / sums["slots"]
    other = [
        label_metrics(r.hits, r.predicted, r.exact, r.slots // k, k, num_experts) for r in sums.itertuples()
    ]
    sums = pd.concat([sums, pd.DataFrame(other, index=sums.index)], axis=1)
    sums["prompts"] = frame.groupby(["predictor", "d"], sort=False)["prompt_id"].nunique().to_numpy()
    sums["design_lookahead"] = sums["predictor"].map(lambda p: design.get(p) or "any")
    return sums


def _recall(rec: pd.DataFrame, predictor: str, ds) -> float:
    g = rec[(rec["predictor"] == predictor) & rec["d"].isin(list(ds))]
    return float(g["hits"].sum() / g["slots"].sum()) if len(g) and g["slots"].sum() else float("nan")


def _at(rec: pd.DataFrame, predictor: str, d: int, col: str) -> float:
    g = rec[(rec["predictor"] == predictor) & (rec["d"] == d)]
    return float(g[col].iloc[0]) if len(g) else float("nan")


def table1(
    rec: pd.DataFrame,
    hits: pd.DataFrame | None,
    g1: int,
    capacity: int,
    d_max: int,
    plugins: list[str] | tuple[str, ...] = (),
) -> pd.DataFrame:
    rows = []
    have = set(rec["predictor"])
    entries = TABLE1 + [(f"plugin {p}", p, "all", "", "") for p in plugins]
    for system, pred, scored, quoted, metric in entries:
        if pred not in have:
            continue
        row = {
            "system": system,
            "predictor": pred,
            "recall_d1": _recall(rec, pred, [1]),
            f"recall_d{g1}": _recall(rec, pred, [g1]),
            "recall_avg_d1_4": _recall(rec, pred, range(1, 5)),
            f"recall_avg_d1_{d_max}": _recall(rec, pred, range(1, d_max + 1)),
            "exact_d1": _at(rec, pred, 1, "exact_match"),
            "label_acc_d1": _at(rec, pred, 1, "label_accuracy"),
            "recall_d0": _at(rec, pred, 0, "recall"),
            "exact_d0": _at(rec, pred, 0, "exact_match"),
            "label_acc_d0": _at(rec, pred, 0, "label_accuracy"),
            "label_f1_d0": _at(rec, pred, 0, "label_f1"),
            "compare_quoted_with": COMPARE.get(scored, ""),
            f"measured_hit_c{capacity}": float("nan"),
            "cache_simulated": "",
            "QUOTED_value": quoted,
            "QUOTED_metric": metric,
        }
        if hits is not None and system in TABLE1_CACHE:
            policy, prefetch = TABLE1_CACHE[system]
            g = hits[
                (hits["policy"] == policy) & (hits["prefetch"] == prefetch) & (hits["capacity"] == capacity)
            ]
            if len(g):
                row[f"measured_hit_c{capacity}"] = float(g["hit_rate"].iloc[0])
                row["cache_simulated"] = f"{policy} + {prefetch} prefetch"
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
def run(cfg, run: Run) -> dict:
    e = cfg.exp
    t_start = time.perf_counter()
    torch.manual_seed(int(cfg.seed))
    builtin = list(e.predictors) + [f"sep_{p}" for p in e.sep_precisions]
    plugins = build_plugin_predictors(e.get("extra_predictors") or [], builtin)  # bad plugins fail first
    lm = load_from_cfg(cfg)
    run.bind_model(lm.name, lm.fingerprint)
    check_length(lm.model, e.prompt_len, e.output_len)
    d_max = int(e.max_lookahead)
    k, lm_slots = lm.adapter.top_k, lm.adapter.num_moe_layers
    group = int(e.group_size or k)
    if int(e.workers) % group or int(e.workers) < group:
        raise OdmoeError(
            f"{e.workers} workers do not split into groups of {group}; use a multiple of the group size"
        )
    g1 = int(e.workers) // group - 1
    if not 1 <= g1 <= d_max or d_max >= lm_slots:
        raise OdmoeError(
            f"exp.max_lookahead={d_max} must cover d = G-1 = {g1} and stay below the {lm_slots} MoE layers; "
            f"set exp.max_lookahead between {max(g1, 1)} and {lm_slots - 1}"
        )
    evals, calib = split_prompts(
        cfg, lm.tokenizer, int(e.prompt_len), int(e.eval_prompts), int(e.calib_prompts)
    )

    from odmoe.predict.shadow import build_shadow, check_precision

    t0 = time.perf_counter()
    shadows = {
        str(p): build_shadow(lm.model, lm.adapter, check_precision(str(p)), float(e.int8_threshold))
        for p in e.sep_precisions
    }
    t_shadows = time.perf_counter() - t0
    t0 = time.perf_counter()
    eval_caps, calib_caps = captures(
        run, lm, evals, calib, int(e.output_len), shadows, e.proc_workers, int(e.batch_prompts)
    )
    t_capture = time.perf_counter() - t0
    del shadows

    # ---- recall per d -------------------------------------------------------------------------
    # Offline work is small tensors and numpy: intra-op threads only add contention.
    torch.set_num_threads(1)
    plain = lambda c: {str(a): b for a, b in (c or {}).items()}  # noqa: E731
    preds = (
        build_predictors(
            lm.adapter,
            builtin,
            max_lookahead=d_max,
            seed=int(cfg.seed),
            learned=plain(e.learned),
            eam_capacity=e.eam_capacity,
            preattn=plain(e.get("preattn")),
            moe_beyond=plain(e.get("moe_beyond")),
        )
        + plugins
    )
    names = [p.name for p in preds]
    table = run.table("recall_prompts", ["predictor", "prompt_id", "d"])
    cache_pairs = {str(p): [str(x) for x in xs] for p, xs in e.cache.pairs.items()}
    for policy in cache_pairs:
        if policy not in POLICIES:
            raise OdmoeError(f"unknown cache policy {policy!r} in exp.cache.pairs; use {', '.join(POLICIES)}")
    prefetchers = {x for xs in cache_pairs.values() for x in xs if x != "none"}
    missing = prefetchers - set(names)
    if missing:
        raise OdmoeError(f"cache prefetchers {sorted(missing)} are not in exp.predictors; add them there")
    kept: dict[str, dict[str, np.ndarray]] = {}
    fit_s, eval_s, costs = {}, {}, []
    for p in preds:
        todo = {
            c.prompt_id for c in eval_caps if not table.done(predictor=p.name, prompt_id=c.prompt_id, d=1)
        }
        if not todo and p.name not in prefetchers:
            continue
        t0 = time.perf_counter()
        p.fit(calib_caps)
        fit_s[p.name] = round(time.perf_counter() - t0, 2)
        costs.append({"predictor": p.name, "fit_wall_s": fit_s[p.name], **getattr(p, "cost", {})})
        t0 = time.perf_counter()
        for c in eval_caps:
            if c.prompt_id not in todo and p.name not in prefetchers:
                continue
            pr = predictions(p, c, d_max)
            if p.name in prefetchers:
                kept.setdefault(p.name, {})[c.prompt_id] = pr
            if c.prompt_id in todo:
                same = same_layer_rows(p, c)  # d = 0: the design point of the same-layer families
                rows = [*hits_by_d(p, pr, c), *([same] if same is not None else [])]
                with signals.deferred():  # all of the prompt's rows or none: d = 1 marks it done
                    table.add_many({"predictor": p.name, "prompt_id": c.prompt_id, **row} for row in rows)
        eval_s[p.name] = round(time.perf_counter() - t0, 2)
    design = {p.name: p.max_lookahead for p in preds}
    frame = table.frame()
    frame = frame[frame["predictor"].isin(names) & frame["prompt_id"].isin([c.prompt_id for c in eval_caps])]
    frame = frame.drop_duplicates(["predictor", "prompt_id", "d"], keep="last")
    rec = recall_table(frame, design, k, lm.adapter.num_experts)
    rec.to_csv(run.path("recall_by_d.csv"), index=False)
    if costs:
        pd.DataFrame(costs).to_csv(run.path("training_cost.csv"), index=False)

    # ---- caches ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    ctable = run.table("cache_prompts", ["policy", "prefetch", "capacity", "prompt_id"])
    eam = EAMPredictor(e.eam_capacity).fit(calib_caps) if "activation" in cache_pairs else None
    matches: dict[str, np.ndarray] = {}
    for policy, prefetch_list in cache_pairs.items():
        for prefetch in prefetch_list:
            for cap in e.cache.capacities:
                for c in eval_caps:
                    if ctable.done(
                        policy=policy, prefetch=prefetch, capacity=int(cap), prompt_id=c.prompt_id
                    ):
                        continue
                    if policy == "activation" and c.prompt_id not in matches:
                        matches[c.prompt_id] = eam_matches(eam, c)
                    h, a = simulate(
                        c,
                        policy,
                        int(cap),
                        None if prefetch == "none" else kept[prefetch][c.prompt_id],
                        int(e.cache.distance),
                        eam,
                        matches.get(c.prompt_id),
                    )
                    ctable.add(
                        {
                            "policy": policy,
                            "prefetch": prefetch,
                            "capacity": int(cap),
                            "prompt_id": c.prompt_id,
                            "hits": h,
                            "accesses": a,
                        }
                    )
    cf = ctable.frame().drop_duplicates(["policy", "prefetch", "capacity", "prompt_id"], keep="last")
    cf = cf[cf["prompt_id"].isin([c.prompt_id for c in eval_caps])]
    hits = (
        cf.groupby(["policy", "prefetch", "capacity"], sort=False)[["hits", "accesses"]].sum().reset_index()
    )
    hits["hit_rate"] = hits["hits"] / hits["accesses"]
    hits.to_csv(run.path("cache_hits.csv"), index=False)
    t_cache = time.perf_counter() - t0

    cap = int(e.cache.table_capacity)
    t1 = table1(rec, hits, g1, cap, d_max, [p.name for p in plugins])
    t1.to_csv(run.path("table1.csv"), index=False)
    recall_vs_d(run.dir, g1)
    cache_hits(run.dir, int(e.cache.distance))

    # ---- summary --------------------------------------------------------------------------------
    summary: dict = {
        "model": lm.name,
        "eval_prompts": len(eval_caps),
        "calib_prompts": len(calib_caps),
        "prompt_len": int(e.prompt_len),
        "output_len": int(e.output_len),
        "top_k": k,
        "num_experts": lm.adapter.num_experts,
        "lookahead_G_minus_1": g1,
        "prompts_disjoint": True,
    }
    for r in t1.itertuples():
        summary[f"recall_d1_{r.predictor}"] = round(r.recall_d1, 4)
        summary[f"recall_d{g1}_{r.predictor}"] = round(getattr(r, f"recall_d{g1}"), 4)
        if np.isfinite(r.recall_d0):  # the same-layer families at their own design point
            for col in ("recall_d0", "exact_d0", "label_acc_d0", "label_f1_d0"):
                summary[f"{col}_{r.predictor}"] = round(getattr(r, col), 4)
    for d in sorted({1, g1}):  # every predictor (the oracle's 1 and the bounds included), best first
        at = rec[rec["d"] == d].sort_values("recall", ascending=False)
        summary[f"ranking_d{d}"] = " > ".join(f"{r.predictor} {r.recall:.4f}" for r in at.itertuples())
    for c in costs:
        for key in ("train_cpu_s", "train_steps", "parameters"):
            if key in c:
                summary[f"{key}_{c['predictor']}"] = c[key]
    summary["recall_avg_d1_4_gate_h"] = (
        round(_recall(rec, "gate_h", range(1, 5)), 4) if "gate_h" in names else None
    )
    for r in hits[hits["capacity"] == cap].itertuples():
        summary[f"hit_c{cap}_{r.policy}_{r.prefetch}"] = round(r.hit_rate, 4)
    if "oracle" in names:
        summary["check_oracle_recall_1"] = bool(
            np.isclose(rec[rec.predictor == "oracle"]["recall"], 1.0).all()
        )
    if "load_after_routing" in names:
        summary["check_load_after_routing_0"] = bool(
            (rec[rec.predictor == "load_after_routing"]["hits"] == 0).all()
        )
    if "random" in names:
        r_all = _recall(rec, "random", range(1, d_max + 1))
        summary["random_recall_all_d"] = round(r_all, 4)
        summary["check_random_near_k_over_E"] = bool(abs(r_all - k / lm.adapter.num_experts) < 0.03)
    summary.update(
        {
            "seconds_shadow_build": round(t_shadows, 1),
            "seconds_reference_passes": round(t_capture, 1),
            "seconds_cache_sim": round(t_cache, 1),
            "seconds_total": round(time.perf_counter() - t_start, 1),
        }
    )
    summary |= {f"seconds_fit_{n}": s for n, s in fit_s.items()}
    summary |= {f"seconds_eval_{n}": s for n, s in eval_s.items()}
    Path(run.path("table1.md")).write_text(
        t1.to_markdown(index=False, floatfmt=".4f") if _has_tabulate() else t1.to_string()
    )
    return summary


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
