"""``+exp=e2e``: end-to-end serving speed and device memory (paper Table 2) of a system and the fully
cached model, on one hardware profile, over the paper's (prompt, output) workloads.

``python -m experiments.run +exp=e2e system=odmoe hardware=cpu-emulated`` runs the fully cached model
(in this process) and OD-MoE (a local cluster of 2 + W processes, ``odmoe.launch.spawn_local``) on
the same prompts. The experiment is a loop over systems x workloads: each system is one call of
:func:`run_system`, which returns one row per request; systems are looked up in :data:`SYSTEMS`
(add a baseline by adding ``conf/system/<name>.yaml`` and an entry there).

Tables: ``requests.csv`` (one row per system, workload, prompt), ``layers.csv`` (OD-MoE: one row per
decode iteration and MoE layer: main and worker time, stall, prediction, shadow lead),
``memory.csv`` (measured peak device bytes per node against the analytic model, for the embedded
model, and the model alone for Mixtral-8x7B on the paper's layout).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from odmoe.data.prompts import load_prompts
from odmoe.errors import OdmoeError
from odmoe.hardware import profile_from_config
from odmoe.models import load_from_cfg
from odmoe.models.load import LoadedModel
from odmoe.paths import repo_root
from odmoe.results import Run
from odmoe.runtime import memory
from odmoe.runtime.cached import run_cached
from odmoe.runtime.layout import Layout
from odmoe.trace import check_length

COLUMNS = (
    "system workload prompt_id prompt_len output_len ttft_s decode_s decode_tok_s output_tok_s lower_bound_s "
    "stall_s stalled_layers mispredicted_experts unpredicted_layers reloads expert_slots expert_slots_hit "
    "bytes_loaded loads peak_total peak_main peak_shadow peak_worker_max peak_worker_mean prefill_peak_total "
    "t_main_mean_s t_worker_nostall_mean_s lead_mean lead_p10 lead_p50 lead_ahead_share lead_hist exact tokens"
).split()


def _row(system: str, workload: str, prompt_id: str, r: dict, exact) -> dict:
    lead = r.get("lead") or {}
    workers = r.get("peak_workers") or []
    row = dict.fromkeys(COLUMNS, np.nan)
    row.update({k: r[k] for k in COLUMNS if k in r})
    row.update(
        system=system,
        workload=workload,
        prompt_id=prompt_id,
        peak_worker_max=max(workers) if workers else np.nan,
        peak_worker_mean=float(np.mean(workers)) if workers else np.nan,
        prefill_peak_total=r.get("prefill_peak_total")
        or (
            r.get("prefill_peak_main", 0)
            + r.get("prefill_peak_shadow", 0)
            + sum(r.get("prefill_peak_workers", []))
        ),
        lead_mean=lead.get("mean", np.nan),
        lead_p10=lead.get("p10", np.nan),
        lead_p50=lead.get("p50", np.nan),
        lead_ahead_share=lead.get("ahead_share", np.nan),
        lead_hist=json.dumps(lead.get("hist", {})),
        exact=exact,
        tokens=" ".join(str(t) for t in r["tokens"]),
    )
    return row


# ---- systems -----------------------------------------------------------------------------------
def _run_cached(cfg, system_cfg, lm: LoadedModel, jobs: list[dict], run: Run) -> list[dict]:
    return run_cached(lm, jobs, threads=int(system_cfg.get("threads", 1)))


def _run_odmoe(cfg, system_cfg, lm: LoadedModel, jobs: list[dict], run: Run) -> list[dict]:
    from odmoe.launch import spawn_local, spec_from_cfg

    spec = spec_from_cfg(cfg, system_cfg, jobs)
    out = run.path(f"cluster-{system_cfg.name}")
    results = spawn_local(spec, out)
    layers = out / "layers.csv"
    if layers.exists():
        df = pd.read_csv(layers)
        df.insert(0, "system", system_cfg.name)
        dst = run.path("layers.csv")
        df.to_csv(dst, mode="a", header=not dst.exists(), index=False)
    return results


SYSTEMS: dict[str, Callable] = {"cached": _run_cached, "odmoe": _run_odmoe}


def system_config(name: str):
    path = repo_root() / "conf" / "system" / f"{name}.yaml"
    if not path.exists() or name not in SYSTEMS:
        known = sorted(set(SYSTEMS) & {p.stem for p in path.parent.glob("*.yaml")})
        raise OdmoeError(f"unknown system {name!r}; use system=<one of {', '.join(known)}>")
    return OmegaConf.load(path)


def run_system(cfg, system_cfg, lm: LoadedModel, jobs: list[dict], run: Run) -> list[dict]:
    """Serve ``jobs`` (``{"id", "prompt", "output_len", ...}``) on one system; one result per job."""
    if system_cfg.name not in SYSTEMS:
        raise OdmoeError(f"system {system_cfg.name!r} has no runner in experiments/e2e.py SYSTEMS")
    return SYSTEMS[system_cfg.name](cfg, system_cfg, lm, jobs, run)


# ---- the experiment ----------------------------------------------------------------------------
def run(cfg, run: Run) -> dict:
    e = cfg.exp
    lm = load_from_cfg(cfg)
    profile = profile_from_config(cfg.hardware)
    baseline = str(e.get("baseline", "cached"))
    systems = [baseline] + [s for s in [cfg.system.name, *e.get("extra_systems", [])] if s != baseline]
    configs = {name: (cfg.system if name == cfg.system.name else system_config(name)) for name in systems}
    workloads = [(int(p), int(o)) for p, o in e.workloads]
    prompts = {}
    for p, o in workloads:
        check_length(lm.model, p, o)
        prompts[(p, o)] = load_prompts(cfg.data, lm.tokenizer, p, int(e.num_prompts))
    table = run.table("requests", key=["system", "workload", "prompt_id"])
    for name in systems:
        jobs = []
        for (p, o), ps in prompts.items():
            for q in ps:
                if not table.done(system=name, workload=f"{p}x{o}", prompt_id=q.id):
                    jobs.append(
                        {"id": q.id, "workload": f"{p}x{o}", "prompt": list(q.token_ids), "output_len": o}
                    )
        if not jobs:
            continue
        done = table.frame()
        base = {(r.workload, r.prompt_id): r.tokens for r in done[done.system == baseline].itertuples()}
        for job, r in zip(jobs, run_system(cfg, configs[name], lm, jobs, run), strict=True):
            tokens = " ".join(str(t) for t in r["tokens"])
            ref = base.get((job["workload"], job["id"]))
            if name == baseline:
                base[(job["workload"], job["id"])] = tokens
                ref = tokens
            table.add(_row(name, job["workload"], job["id"], r, None if ref is None else bool(ref == tokens)))
    df = table.frame()
    mem = memory_table(cfg, lm, configs.get("odmoe"), df, workloads)
    mem.to_csv(run.path("memory.csv"), index=False)
    return summarize(df, mem, baseline, cfg.system.name, profile, workloads)


def memory_table(cfg, lm: LoadedModel, odmoe_cfg, df: pd.DataFrame, workloads) -> pd.DataFrame:
    """Measured peak decode-phase device bytes per node against the analytic model (embedded model), and
    the model alone for Mixtral-8x7B on the paper's layout (8 workers, INT8 shadow, fp32 main and experts)."""
    rows = []
    if odmoe_cfg is not None:
        shape = memory.shape_from_config(lm.model.config)
        sh = odmoe_cfg.get("shadow", {})
        precision = "fp32" if sh.get("predictor") == "inverted" else str(sh.get("precision", "int8"))
        a = lm.adapter
        slots = Layout.build(
            int(odmoe_cfg.workers),
            a.top_k,
            a.num_experts,
            a.moe_layers,
            odmoe_cfg.get("group_size"),
            odmoe_cfg.get("slots"),
        ).slots
        for p, o in workloads:
            model = memory.memory_model(
                shape,
                int(odmoe_cfg.workers),
                p,
                o,
                slots,
                precision,
                expert_dtype=str(odmoe_cfg.get("expert_dtype", "fp32")),
            )
            sel = df[(df.system == "odmoe") & (df.workload == f"{p}x{o}")]
            cached = df[(df.system == "cached") & (df.workload == f"{p}x{o}")]
            measured = {
                "main": sel.peak_main.max(),
                "shadow": sel.peak_shadow.max(),
                "worker": sel.peak_worker_max.max(),
                "total": sel.peak_total.max(),
                "cached": cached.peak_total.max() if len(cached) else np.nan,
            }
            for node, value in measured.items():
                rows.append(
                    {
                        "model": lm.name,
                        "workload": f"{p}x{o}",
                        "node": node,
                        "measured": value,
                        "model_bytes": model[node],
                    }
                )
    mix = memory.shape_from_config(memory.sim_model_config("mixtral-8x7b"))
    model = memory.memory_model(mix, 8, 128, 256, 1, "int8")
    for node in ("main", "shadow", "worker", "total", "cached"):
        rows.append(
            {
                "model": "mixtral-8x7b",
                "workload": "128x256",
                "node": node,
                "measured": np.nan,
                "model_bytes": model[node],
            }
        )
    out = pd.DataFrame(rows)
    out["ratio"] = out["measured"] / out["model_bytes"]
    return out


def summarize(df: pd.DataFrame, mem: pd.DataFrame, baseline: str, system: str, profile, workloads) -> dict:
    s: dict = {"system": system, "baseline": baseline}
    means = df.groupby(["system", "workload"])[["decode_tok_s", "ttft_s", "output_tok_s"]].mean()
    for p, o in workloads:
        w = f"{p}x{o}"
        for name in (baseline, system):
            if (name, w) in means.index:
                s[f"{name}_decode_tok_s_{w}"] = float(means.loc[(name, w), "decode_tok_s"])
                s[f"{name}_ttft_s_{w}"] = float(means.loc[(name, w), "ttft_s"])
    mine, base = df[df.system == system], df[df.system == baseline]
    if system != baseline and len(mine) and len(base):
        per_w = mine.groupby("workload").decode_tok_s.mean()
        per_b = base.groupby("workload").decode_tok_s.mean()
        s["decode_tok_s"] = float(per_w.mean())
        s["baseline_decode_tok_s"] = float(per_b.mean())
        s["decode_fraction_of_baseline"] = float(per_w.mean() / per_b.mean())
        s["output_tok_s"] = float(mine.groupby("workload").output_tok_s.mean().mean())
        s["baseline_output_tok_s"] = float(base.groupby("workload").output_tok_s.mean().mean())
        s["ttft_s"] = float(mine.ttft_s.mean())
        s["baseline_ttft_s"] = float(base.ttft_s.mean())
        s["exact_share"] = float(mine.exact.astype(float).mean())
    if "lower_bound_s" in mine and mine.lower_bound_s.notna().any():
        s["decode_s"] = float(mine.decode_s.sum())
        s["lower_bound_s"] = float(mine.lower_bound_s.sum())
        s["stall_overhead_over_bound"] = float(mine.decode_s.sum() / mine.lower_bound_s.sum() - 1)
        s["stall_s"] = float(mine.stall_s.sum())
        s["stalled_layers"] = int(mine.stalled_layers.sum())
        s["mispredicted_experts"] = int(mine.mispredicted_experts.sum())
        s["unpredicted_layers"] = int(mine.unpredicted_layers.sum())
        s["expert_hit_rate"] = float(mine.expert_slots_hit.sum() / mine.expert_slots.sum())
        s["bytes_loaded"] = int(mine.bytes_loaded.sum())
        s["lead_mean_layers"] = float(mine.lead_mean.mean())
        s["lead_ahead_share"] = float(mine.lead_ahead_share.mean())
        s["t_main_mean_ms"] = float(mine.t_main_mean_s.mean() * 1e3)
        s["t_worker_nostall_mean_ms"] = float(mine.t_worker_nostall_mean_s.mean() * 1e3)
    for r in mem.itertuples():
        key = f"mem_{r.model}_{r.node}" if r.model == "mixtral-8x7b" else f"mem_{r.node}_{r.workload}"
        s[key + "_model_bytes"] = float(r.model_bytes)
        if np.isfinite(r.measured):
            s[key + "_measured_bytes"] = float(r.measured)
            s[key + "_ratio"] = float(r.ratio)
    emb = mem[(mem.model != "mixtral-8x7b") & mem.measured.notna()]
    if len(emb):
        s["mem_max_abs_error"] = float((emb.ratio - 1).abs().max())
    return s


def read_tables(run_dir: str | Path) -> dict[str, pd.DataFrame]:
    run_dir = Path(run_dir)
    return {p.stem: pd.read_csv(p) for p in run_dir.glob("*.csv")}
