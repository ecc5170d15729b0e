"""``+exp=e2e``: the paper's Table 2 — every system on the paper's (prompt, output) workloads, on one
hardware profile, in one invocation::

    python -m experiments.run +exp=e2e hardware=cpu-emulated                       # every system
    python -m experiments.run +exp=e2e hardware=cpu-emulated 'exp.systems=[cached,odmoe]'   # OD-MoE only

Systems run on one of two *executors*, both on the run's one clock (``timing``: ``measured`` or
``modelled`` on an emulated profile, ``wall`` on a GPU; ``odmoe/clock.py``, ``baselines.report.CLOCKS``):

* ``runtime``: OD-MoE on a local cluster of 2 + W processes (``odmoe.launch.spawn_local``), every rank on
  its own virtual clock, messages carrying virtual times; and the fully cached model in this process
  (``odmoe/runtime/cached.py``), on the same clock and ledger.
* ``engine``: the fully cached model and every offloading baseline on the single-process offload engine
  of ``baselines/``.

The fully cached model runs on each executor the listed systems use, so every system is also compared
with it on its own executor. With ``timing=modelled timing.shape=S`` and ``S`` deeper than the executed
model, each executed layer is priced as one layer of ``S`` and every time in ``table2.csv`` is scaled to
``S``'s depth (``depth_scale`` = layers of S / executed layers; rates divided by it); shares of the cached
model do not depend on it. ``system=NAME`` (default ``odmoe``) is the system under test: its headline
keys (``decode_fraction_of_baseline``, ``stall_overhead_over_bound``, ``mem_*`` ...) are against the
fully cached model on the same executor. When the run's profile has no host->device link (``host``)
on a CPU machine, every system runs on ``exp.hardware`` instead; the summary's ``hardware_profile``
says which profile was used (and ``hardware_requested`` the one asked for).

Tables: ``table2.csv`` (one row per system, executor and workload, means over prompts, the same
columns for every system), ``table2.md`` (beside the paper's numbers, ``baselines/report.py``),
figures (``plots/e2e.py``). Runtime details: ``requests.csv`` (one row per system, workload and
prompt), ``layers.csv`` (OD-MoE: one row per decode iteration and MoE layer: main and worker time,
stall, prediction, shadow lead), ``memory.csv`` (measured peak device bytes per node against the
analytic model for the embedded model, and the model alone for Mixtral-8x7B on the paper's layout).
Single-device executors' per-layer records (``odmoe.record``; the simulator's replay input):
``records/engine/<system>-<P>x<O>.*.parquet`` and ``records/runtime/cached-<P>x<O>.*.parquet``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from baselines import SYSTEMS as ENGINE_SYSTEMS
from baselines import Workload, reference_tokens
from baselines import run_system as run_engine_system
from baselines.measure import plugin_policy
from baselines.report import label, markdown
from odmoe.clock import Timing, resolve_timing
from odmoe.data.corpus import split_chapters
from odmoe.data.prompts import load_prompts
from odmoe.errors import OdmoeError
from odmoe.hardware import HardwareProfile, load_profile, profile_from_config
from odmoe.models import load_from_cfg
from odmoe.models.load import LoadedModel
from odmoe.paths import repo_root
from odmoe.plugins import is_plugin
from odmoe.record import save_records
from odmoe.results import ResultTable, Run
from odmoe.runtime import memory
from odmoe.runtime.cached import run_cached
from odmoe.runtime.layout import Layout
from odmoe.trace import check_length

log = logging.getLogger("odmoe")

COLUMNS = (
    "system workload prompt_id prompt_len output_len ttft_s decode_s decode_tok_s output_tok_s lower_bound_s "
    "stall_s stalled_layers mispredicted_experts unpredicted_layers reloads expert_slots expert_slots_hit "
    "bytes_loaded loads peak_total peak_main peak_shadow peak_worker_max peak_worker_mean prefill_peak_total "
    "t_main_mean_s t_worker_nostall_mean_s lead_mean lead_p10 lead_p50 lead_ahead_share lead_hist exact "
    "agreement tokens prefill_counts"
).split()
# table2.csv: the same columns for every system (NaN where a column does not apply)
TABLE2 = (
    "system executor clock shape depth_scale hardware timing_emulated prompt_len output_len prompts ttft_ms "
    "decode_tps "
    "output_tps decode_tps_bound peak_device_mb cuda_peak_mb agreement perplexity lossy expert_format "
    "hit_rate stall_s prefill_stall_s link_mb loads prefetches prefetch_used skipped_share low_share calib_size "
    "calibration"
).split()


def held_out_ids(tokenizer, n: int) -> list[int]:
    """``n`` tokens from the end of the longest evaluation chapter (never trained on): perplexity text."""
    ids = max((tokenizer(t)["input_ids"] for t in split_chapters("eval")), key=len)
    if len(ids) < n:
        raise OdmoeError(
            f"the longest evaluation chapter has {len(ids)} tokens; ask for exp.ppl_tokens <= {len(ids)}"
        )
    return list(ids[-n:])


# ---- the runtime executor ----------------------------------------------------------------------
def _run_cached(cfg, system_cfg, lm: LoadedModel, jobs: list[dict], run: Run) -> list[dict]:
    hardware = profile_from_config(cfg.hardware)
    timing = resolve_timing(cfg.timing, hardware, str(cfg.get("device", "auto")))
    threads, devices = int(system_cfg.get("threads", 1)), int(system_cfg.get("devices", 8))
    results = run_cached(lm, jobs, timing, hardware, threads=threads, devices=devices)
    by_workload: dict[str, list] = {}
    for job, r in zip(jobs, results, strict=True):
        by_workload.setdefault(job["workload"], []).append((job["id"], r.pop("record")))
    for workload, records in by_workload.items():
        save_records(records, run.path("records") / "runtime" / f"cached-{workload}")
    return results


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


RUNTIME: dict[str, Callable] = {"cached": _run_cached, "odmoe": _run_odmoe}
ALL_SYSTEMS = ("cached", "odmoe", *(s for s in ENGINE_SYSTEMS if s != "cached"))


def plan(systems: Sequence[str], under_test: str, plugins: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(system, executor) pairs to run, the fully cached model first, once per executor used. ``plugins``:
    names of user policies (``system=custom``), which run on the offload engine."""
    unknown = [s for s in systems if s not in ALL_SYSTEMS and s not in plugins]
    if unknown:
        raise OdmoeError(
            f"unknown systems {unknown} in exp.systems; choose from {', '.join(ALL_SYSTEMS)}, or bring your own "
            "with system=custom system.policy._target_=mypkg.MyPolicy (docs/extending.md)"
        )
    if under_test not in systems:
        raise OdmoeError(
            f"the system under test (system={under_test}) is not in exp.systems={list(systems)}; "
            f"add it there or pass system=<one of them>"
        )
    others = [(s, "runtime" if s in RUNTIME else "engine") for s in dict.fromkeys(systems) if s != "cached"]
    executors = sorted({e for _, e in others}) or ["engine"]
    return ([("cached", e) for e in executors] if "cached" in systems else []) + others


def _row(system: str, workload: str, prompt_id: str, r: dict, reference: Sequence[int]) -> dict:
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
        exact=list(r["tokens"]) == list(reference),
        agreement=float(np.mean(np.asarray(r["tokens"]) == np.asarray(reference))),
        tokens=" ".join(str(t) for t in r["tokens"]),
        # OD-MoE: the prompt's rows per expert, per MoE layer (row-major), for the simulator's prefill
        prefill_counts=" ".join(str(c) for layer in r.get("prefill_counts", []) for c in layer) or np.nan,
    )
    return row


def _serve_runtime(cfg, name: str, system_cfg, lm, workloads, references, requests: ResultTable, run) -> None:
    """Serve every prompt of every workload not yet in ``requests.csv`` on the runtime; one row each."""
    jobs = [
        {
            "id": pid,
            "workload": f"{w.prompt_len}x{w.output_len}",
            "prompt": list(ids),
            "output_len": w.output_len,
        }
        for w in workloads
        for pid, ids in w.prompts
        if not requests.done(system=name, workload=f"{w.prompt_len}x{w.output_len}", prompt_id=pid)
    ]
    if not jobs:
        return
    for job, r in zip(jobs, RUNTIME[name](cfg, system_cfg, lm, jobs, run), strict=True):
        ref = references[(tuple(job["prompt"]), job["output_len"])]
        requests.add(_row(name, job["workload"], job["id"], r, ref))


def _runtime_table2(req: pd.DataFrame, name: str, w: Workload, timing: Timing, system_cfg) -> dict:
    """One Table 2 row (means over prompts) of a runtime system from its ``requests.csv`` rows."""
    g = req[(req.system == name) & (req.workload == f"{w.prompt_len}x{w.output_len}")]
    slots = g.expert_slots.sum()
    return {
        "system": name,
        "executor": "runtime",
        "clock": timing.mode,
        "timing_emulated": timing.virtual,
        "prompts": len(g),
        "ttft_ms": 1e3 * g.ttft_s.mean(),
        "decode_tps": g.decode_tok_s.mean(),
        "output_tps": g.output_tok_s.mean(),
        "decode_tps_bound": ((w.output_len - 1) / g.lower_bound_s).mean(),
        "peak_device_mb": np.nanmax([g.peak_total.max(), g.prefill_peak_total.max()]) / 1e6,
        "agreement": g.agreement.mean(),
        "lossy": False,
        "expert_format": str(system_cfg.get("expert_dtype", "fp32")),
        "hit_rate": g.expert_slots_hit.sum() / slots if slots > 0 else np.nan,
        "stall_s": g.stall_s.fillna(0).mean(),
        "link_mb": g.bytes_loaded.fillna(0).mean() / 1e6,
        "loads": g.loads.fillna(0).sum(),
    }


# ---- the experiment ----------------------------------------------------------------------------
def resolve_hardware(cfg, lm: LoadedModel) -> HardwareProfile:
    """The profile every system runs on: the run's, or ``exp.hardware`` when the run's has no link on CPU."""
    hardware = profile_from_config(cfg.hardware)
    on_cuda = next(lm.model.parameters()).device.type == "cuda"
    if not on_cuda and hardware.h2d_bandwidth is None:
        log.warning(
            "hardware profile %s has no link; every system runs on %s", hardware.name, cfg.exp.hardware
        )
        hardware = load_profile(str(cfg.exp.hardware))
    return hardware


def _system_cfg(cfg, name: str) -> DictConfig:
    """``conf/system/<name>.yaml`` (the command line's ``system`` when it names it) + ``exp.overrides``."""
    base = cfg.system if cfg.system.name == name else OmegaConf.load(repo_root() / f"conf/system/{name}.yaml")
    extra = (cfg.exp.get("overrides") or {}).get(name) or {}
    return OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(base, resolve=True)), extra)


def _workloads(cfg, lm: LoadedModel) -> list[Workload]:
    """The paper's workloads with their prompts (the same prompts for every output length)."""
    by_len: dict[int, tuple] = {}
    out = []
    for p, o in cfg.exp.workloads:
        p, o = int(p), int(o)
        check_length(lm.model, p, o)
        if p not in by_len:
            prompts = load_prompts(cfg.data, lm.tokenizer, p, int(cfg.exp.num_prompts))
            by_len[p] = tuple((x.id, tuple(x.token_ids)) for x in prompts)
        out.append(Workload(p, o, by_len[p]))
    return out


def run(cfg, run: Run) -> dict:
    e = cfg.exp
    torch.set_num_threads(int(e.threads))  # the measured clock reads one thread's CPU time
    under_test = str(cfg.system.name)
    systems, plugins = [str(s) for s in e.systems], []
    if is_plugin(
        cfg.system
    ):  # a user's policy: checked before anything runs, then run as the system under test
        if under_test in ALL_SYSTEMS:
            raise OdmoeError(
                f"system.name={under_test} is a built-in system; name your policy's row something else "
                "(system.name=mine)"
            )
        plugin_policy(under_test, OmegaConf.to_container(cfg.system, resolve=True))
        plugins = [under_test]
        systems += [] if under_test in systems else [under_test]
    runs = plan(systems, under_test, plugins)
    if str(cfg.get("device", "auto")) == "auto" and cfg.hardware.get("emulated"):
        cfg = OmegaConf.merge(cfg, {"device": "cpu"})  # an emulated profile runs every system on the CPU
    lm = load_from_cfg(cfg)
    run.bind_model(lm.name, lm.fingerprint)
    hardware = resolve_hardware(cfg, lm)
    timing = resolve_timing(cfg.timing, hardware, str(cfg.get("device", "auto")))
    run.meta["hardware"].update(
        profile=hardware.name, emulated=timing.virtual, requested=cfg.hardware.name, timing=timing.describe()
    )
    on_hw = OmegaConf.create({**OmegaConf.to_container(cfg, resolve=True), "hardware": asdict(hardware)})
    depth = _depth_scale(timing, lm)
    workloads = _workloads(cfg, lm)
    t0 = time.perf_counter()
    references = reference_tokens(lm, workloads)
    log.info("fp32 references: %.0f s", time.perf_counter() - t0)
    ppl_ids = held_out_ids(lm.tokenizer, int(e.ppl_tokens))
    requests = run.table("requests", key=["system", "workload", "prompt_id"])
    table = run.table("table2", key=["system", "executor", "prompt_len", "output_len"])
    configs = {name: _system_cfg(cfg, name) for name in dict.fromkeys(s for s, _ in runs)}
    for name, executor in runs:
        todo = [
            w
            for w in workloads
            if not table.done(
                system=name, executor=executor, prompt_len=w.prompt_len, output_len=w.output_len
            )
        ]
        if not todo:
            continue
        t0 = time.perf_counter()
        if executor == "engine":
            cfg_dict = OmegaConf.to_container(configs[name], resolve=True)
            rows = run_engine_system(
                name,
                cfg_dict,
                lm,
                todo,
                hardware,
                references,
                ppl_ids,
                record_dir=run.path("records") / "engine",
                timing=timing,
            )
            rows = [{**r, "executor": executor} for r in rows]
        else:
            _serve_runtime(on_hw, name, configs[name], lm, todo, references, requests, run)
            req = requests.frame()
            rows = [_runtime_table2(req, name, w, timing, configs[name]) for w in todo]
        for w, r in zip(todo, rows, strict=True):
            r.update(hardware=hardware.name, prompt_len=w.prompt_len, output_len=w.output_len)
            r.update(shape=timing.shape or lm.name, **_at_depth(r, depth))
            table.add({c: r.get(c, np.nan) for c in TABLE2})
        log.info("%s on the %s: %d workloads in %.0f s", name, executor, len(todo), time.perf_counter() - t0)
    t2, req = table.frame(), requests.frame()
    mem = memory_table(lm, configs.get("odmoe"), req, workloads)
    mem.to_csv(run.path("memory.csv"), index=False)
    run.path("table2.md").write_text(markdown(t2, _note(lm, hardware, timing, depth, cfg)))
    try:
        from plots.e2e import draw_all

        if e.get("figures", True):
            draw_all(run.dir)
    except ImportError as err:  # matplotlib missing: the tables are still complete
        log.warning("no figures: %s", err)
    s = {"model": lm.name, "hardware_profile": hardware.name, "hardware_emulated": timing.virtual}
    s["hardware_requested"] = str(cfg.hardware.name)
    s |= {"clock": timing.mode, "timing_shape": timing.shape or lm.name, "depth_scale": depth}
    return s | summarize(t2, req, mem, under_test, workloads)


def _depth_scale(timing: Timing, lm: LoadedModel) -> float:
    """Priced layers per executed layer under ``timing=modelled`` at a deeper shape (1 otherwise)."""
    if timing.mode != "modelled" or not timing.shape:
        return 1.0
    from odmoe.sim.shapes import load_shape

    return load_shape(timing.shape).num_layers / lm.adapter.num_layers


def _at_depth(row: dict, depth: float) -> dict:
    """Times scaled to the priced shape's depth, rates divided by it (identity at depth 1)."""
    out = {"depth_scale": depth}
    for col in ("ttft_ms", "stall_s", "prefill_stall_s"):
        if row.get(col) is not None:
            out[col] = row[col] * depth
    for col in ("decode_tps", "output_tps", "decode_tps_bound"):
        if row.get(col) is not None:
            out[col] = row[col] / depth
    return out


def _note(lm: LoadedModel, hardware: HardwareProfile, timing: Timing, depth: float, cfg) -> str:
    link = f"{hardware.h2d_bandwidth / 1e6:.1f} MB/s" if hardware.h2d_bandwidth else "no"
    priced = (
        f"compute priced by the cost model at shape `{timing.shape or lm.name}`"
        if timing.mode == "modelled"
        else "compute measured as each executor's thread CPU time"
        + (" at the reference host's speed (calibrated by a probe)" if timing.probe else " (uncalibrated)")
    )
    kind = (
        f"**emulated**, clock `{timing.mode}`: {priced}, device memory ledgered, host->device loads over the "
        f"profile's {link} link and messages over its LAN, in virtual time; not a GPU measurement"
        if timing.virtual
        else "real devices, wall clock"
    )
    if depth != 1.0:
        kind += f"; times scaled by depth {depth:g} to `{timing.shape}`'s layer count"
    asked = (
        "" if hardware.name == cfg.hardware.name else f" (asked for `{cfg.hardware.name}`, which has no link)"
    )
    return (
        f"Model {lm.name}; hardware profile `{hardware.name}`{asked} ({kind}); {int(cfg.exp.num_prompts)} "
        "prompts per workload; each cell is the mean over prompts. Paper numbers are Mixtral-8x7B on RTX 3090s."
    )


def memory_table(lm: LoadedModel, odmoe_cfg, df: pd.DataFrame, workloads: Sequence[Workload]) -> pd.DataFrame:
    """Measured peak decode-phase device bytes per node against the analytic model (embedded model), and
    the model alone for Mixtral-8x7B on the paper's layout (8 workers, INT8 shadow, fp32 main and experts)."""
    rows = []
    if odmoe_cfg is not None and len(df) and (df.system == "odmoe").any():
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
        for w in workloads:
            p, o = w.prompt_len, w.output_len
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


def summarize(
    t2: pd.DataFrame, req: pd.DataFrame, mem: pd.DataFrame, system: str, workloads: Sequence[Workload]
) -> dict:
    """Flat headline figures: Table 2 per column, the system under test against the fully cached model
    on its own executor, and (runtime systems) the per-request details of issue 5."""
    s: dict = {"system": system, "baseline": "cached"}
    t2 = t2.assign(label=[label(a, b) for a, b in zip(t2.system, t2.executor, strict=True)])
    means = t2.groupby("label")[["ttft_ms", "decode_tps", "output_tps", "peak_device_mb", "agreement"]].mean()
    for lab, r in means.iterrows():
        for col, digits in (("ttft_ms", 2), ("decode_tps", 4), ("output_tps", 4), ("peak_device_mb", 4)):
            s[f"{lab}_{col}"] = round(float(r[col]), digits)
        s[f"{lab}_agreement"] = round(float(r.agreement), 4)
    mine = t2[t2.system == system]
    if len(mine):
        base = label("cached", mine.executor.iloc[0])
        s["system_executor"] = str(mine.executor.iloc[0])
        s["system_clock"] = str(mine.clock.iloc[0])
        s["decode_tok_s"] = float(mine.decode_tps.mean())
        s["output_tok_s"] = float(mine.output_tps.mean())
        s["ttft_s"] = float(mine.ttft_ms.mean() / 1e3)
        if base in means.index and base != system:
            b = t2[t2.label == base]
            s["baseline_decode_tok_s"] = float(b.decode_tps.mean())
            s["baseline_output_tok_s"] = float(b.output_tps.mean())
            s["baseline_ttft_s"] = float(b.ttft_ms.mean() / 1e3)
            s["decode_fraction_of_baseline"] = s["decode_tok_s"] / s["baseline_decode_tok_s"]
    return s | _request_details(req, mem, system, workloads)


def _request_details(req: pd.DataFrame, mem: pd.DataFrame, system: str, workloads) -> dict:
    """Per-workload runtime speeds, exactness, stalls against the zero-stall bound, memory against the model."""
    s: dict = {}
    if len(req):
        means = req.groupby(["system", "workload"])[["decode_tok_s", "ttft_s"]].mean()
        for w in workloads:
            key = f"{w.prompt_len}x{w.output_len}"
            for name in dict.fromkeys(["cached", system]):
                if (name, key) in means.index:
                    s[f"{name}_decode_tok_s_{key}"] = float(means.loc[(name, key), "decode_tok_s"])
                    s[f"{name}_ttft_s_{key}"] = float(means.loc[(name, key), "ttft_s"])
    mine = req[req.system == system] if len(req) else req
    if len(mine):
        s["exact_share"] = float(mine.exact.astype(float).mean())
    if len(mine) and mine.lower_bound_s.notna().any():
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
