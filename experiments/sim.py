"""``+exp=sim``: simulate OD-MoE, the fully cached model and a single-device offloader on one hardware profile.

Writes ``requests.csv`` (TTFT, decode and output tok/s per system), ``gantt.csv`` (a Fig. 2-style timing diagram),
``stalls.csv`` (per-layer stalls), ``eq1.csv`` (Eq. 1 per layer), ``memory.csv`` and ``whatif.csv`` (decode speed
versus workers, link bandwidth, worker expert format and recall, each with the physical I/O bound), and figures.
"""

from __future__ import annotations

import math

import numpy as np

from odmoe.costs import Formats, ModelCosts
from odmoe.results import Run
from odmoe.sim import analysis
from odmoe.sim import recall as rc
from odmoe.sim.config import costs_of, formats_of, hardware_of, hits_of, odmoe_of, shape_of
from odmoe.sim.distributed import ODMoEConfig, counts_from_routing, simulate_decode, simulate_request
from odmoe.sim.offload import (
    OffloadPolicy,
    load_routing,
    predict_sets,
    simulate_cached,
    simulate_offload,
    synthetic_routing,
)
from plots.sim import plot_eq1, plot_gantt, plot_whatif

GB = 1e9


def decode_tok_s(
    shape, costs, cfg: ODMoEConfig, recall: float | None, trace, iterations: int, ctx0: int, seeds
) -> float:
    """Mean decode speed over recall draws (one draw when the hits are deterministic)."""
    speeds = []
    for seed in seeds:
        hits = hits_of(shape, cfg, iterations, recall, trace, seed)
        speeds.append(iterations / simulate_decode(shape, costs, cfg, hits, ctx0=ctx0).time)
        if trace or cfg.predictor == "none":
            break
    return float(np.mean(speeds))


def run(cfg, run: Run) -> dict:
    e = cfg.exp
    hw = hardware_of(cfg)
    shape = shape_of(e.model, cfg.model)
    fmts = formats_of(e.formats)
    ocfg = odmoe_of(e.odmoe, hw)
    costs = costs_of(shape, hw, fmts, e.measured_times)
    P, N = int(e.prompt_len), int(e.output_len)
    seeds = [int(cfg.seed) + s for s in range(int(e.seeds))]
    trace = e.recall_trace

    # ---- the configured systems ----
    counts = None  # tokens per expert in prefill: from a real trace, else uniform routing
    if e.routing_trace:
        counts = counts_from_routing(shape, load_routing(e.routing_trace, 1, shape.num_moe_layers)[1])
    req = run.table("requests", key=["system", "seed"])
    for seed in seeds:
        if req.done(system="odmoe", seed=seed):
            continue
        hits = hits_of(shape, ocfg, N - 1, e.recall, trace, seed)
        first = seed == seeds[0]
        r = simulate_request(
            shape, costs, ocfg, P, N, hits, counts, record=int(e.gantt.iterations) if first else 0
        )
        if first:
            gantt = run.table("gantt", key=["resource", "kind", "iteration", "layer", "start_s"])
            for res, kind, it, layer, s0, s1 in r.decode.timeline.spans:
                gantt.add(
                    {
                        "resource": res,
                        "kind": kind,
                        "iteration": it,
                        "layer": layer,
                        "start_s": s0,
                        "end_s": s1,
                    }
                )
            stalls = run.table("stalls", key=["moe_layer"])
            for j, layer in enumerate(shape.moe_layers):
                stalls.add(
                    {
                        "moe_layer": j,
                        "layer": layer,
                        "mean_stall_s": float(r.decode.stall[:, j].mean()),
                        "stalled_share": float((r.decode.stall[:, j] > 1e-12).mean()),
                        "reloads_per_token": float(r.decode.late_loads[:, j].mean()),
                    }
                )
        req.add(_row("odmoe", seed, r.ttft, r.decode_time, P, N, rc.recall_of(hits, shape.top_k)))
    if not req.done(system="cached", seed=seeds[0]):
        ttft, dec = simulate_cached(shape, costs, P, N)
        req.add(_row("cached", seeds[0], ttft, dec, P, N, math.nan))
    off = e.offload
    policy = OffloadPolicy(
        "offload", int(off.cache_per_layer), off.expert_fmt, int(off.prefetch), int(off.lookahead)
    )
    for seed in seeds:
        if req.done(system="offload", seed=seed):
            continue
        prefill = None
        if e.routing_trace:  # cache hits from a real routing trace
            routing, prefill = load_routing(e.routing_trace, N - 1, shape.num_moe_layers)
        else:
            routing = synthetic_routing(
                N - 1, shape.num_moe_layers, shape.num_experts, shape.top_k, seed, off.stickiness
            )
        pred = predict_sets(routing, float(off.prefetch_recall), shape.num_experts, seed)
        res = simulate_offload(shape, costs, policy, routing, P, pred, prefill)
        req.add(_row("offload", seed, res.ttft, res.decode_time, P, N, res.hit_rate))
    df = req.frame().groupby("system").mean(numeric_only=True)

    # ---- Eq. 1, memory ----
    eq1 = analysis.eq1_table(shape, costs, ocfg, ctx=P)
    eq1_t = run.table("eq1", key=["moe_layer"])
    for row in eq1.to_dict("records"):
        if not eq1_t.done(moe_layer=row["moe_layer"]):
            eq1_t.add(row)
    mem = analysis.node_memory(shape, fmts, ocfg, P + N)
    mem_t = run.table("memory", key=["node"])
    for node, nbytes in mem.items():
        if not mem_t.done(node=node):
            mem_t.add({"node": node, "gb": nbytes / GB})
    offload_gb = (
        shape.nonexpert_params * 4
        + shape.num_moe_layers * policy.cache_per_layer * shape.expert_bytes(policy.expert_fmt)
    )

    # ---- what-ifs ----
    wi = run.table("whatif", key=["sweep", "value"])
    it, wseed = N - 1, seeds[:1]
    cached_tok_s = float(df.loc["cached", "decode_tok_s"])
    offload_tok_s = float(df.loc["offload", "decode_tok_s"])

    def point(sweep: str, value, c: ODMoEConfig, costs_x, hw_x, fmt: str, recall) -> None:
        if wi.done(sweep=sweep, value=value):
            return
        inf = ModelCosts(
            shape,
            hw_x.with_(h2d_bandwidth=math.inf, h2d_latency=0.0),
            Formats(**{**fmts.__dict__, "worker": fmt}),
        )
        wi.add(
            {
                "sweep": sweep,
                "value": value,
                "odmoe_tok_s": decode_tok_s(
                    shape, costs_x, c, recall, trace if sweep != "recall" else None, it, P, wseed
                ),
                "io_bound_tok_s": analysis.io_bound_tok_s(shape, c.num_workers, hw_x.h2d_bandwidth, fmt),
                "compute_path_tok_s": decode_tok_s(shape, inf, c, 1.0, None, it, P, wseed),
                "min_slack_ms": float(analysis.eq1_table(shape, costs_x, c, ctx=P)["slack_s"].min() * 1e3),
                "cached_tok_s": cached_tok_s,
                "offload_tok_s": offload_tok_s,
            }
        )

    gs = ocfg.group_size or shape.top_k
    for w in e.whatif.workers:
        if w % gs == 0:
            c = ODMoEConfig(**{**ocfg.__dict__, "num_workers": int(w)})
            point("workers", w, c, costs, hw, fmts.worker, e.recall)
    for gbps in e.whatif.h2d_gbps:
        hw_x = hw.with_(h2d_bandwidth=float(gbps) * GB)
        point("h2d_gbps", gbps, ocfg, costs_of(shape, hw_x, fmts), hw_x, fmts.worker, e.recall)
    for fmt in e.whatif.worker_formats:
        f_x = Formats(**{**fmts.__dict__, "worker": fmt})
        point("worker_format", fmt, ocfg, costs_of(shape, hw, f_x), hw, fmt, e.recall)
    for r in e.whatif.recalls:
        point("recall", r, ocfg, costs, hw, fmts.worker, float(r))

    # recall at which cacheless OD-MoE matches the single-device offloader (on the same profile)
    def speed_at(r: float) -> float:
        return decode_tok_s(shape, costs, ocfg, r, None, it, P, wseed)

    pays = analysis.solve_increasing(speed_at, offload_tok_s, 0.0, 1.0, tol=1e-3)
    w_df = wi.frame()

    plot_gantt(run.path("gantt.csv"), run.path("gantt.png"), int(e.gantt.first_layer), int(e.gantt.layers))
    plot_eq1(run.path("eq1.csv"), run.path("eq1.png"))
    plot_whatif(run.path("whatif.csv"), run.path("whatif.png"))

    workers = w_df[w_df["sweep"] == "workers"].copy()
    workers["value"] = workers["value"].astype(float)
    enough = workers[workers["odmoe_tok_s"] >= 0.95 * workers["odmoe_tok_s"].max()]
    od = df.loc["odmoe"]
    return {
        "model": shape.name,
        "prompt_len": P,
        "output_len": N,
        "recall": float(od["recall_or_hit_rate"]),
        "num_workers": ocfg.num_workers,
        "num_groups": ocfg.num_workers // gs,
        "worker_format": fmts.worker,
        "expert_load_ms": costs.load() * 1e3,
        "odmoe_ttft_s": float(od["ttft_s"]),
        "odmoe_decode_tok_s": float(od["decode_tok_s"]),
        "odmoe_output_tok_s": float(od["output_tok_s"]),
        "cached_ttft_s": float(df.loc["cached", "ttft_s"]),
        "cached_decode_tok_s": cached_tok_s,
        "cached_output_tok_s": float(df.loc["cached", "output_tok_s"]),
        "offload_decode_tok_s": offload_tok_s,
        "offload_hit_rate": float(df.loc["offload", "recall_or_hit_rate"]),
        "offload_gpu_gb": offload_gb / GB,
        "odmoe_vs_cached": float(od["decode_tok_s"]) / cached_tok_s,
        "io_bound_tok_s": analysis.io_bound_tok_s(shape, ocfg.num_workers, hw.h2d_bandwidth, fmts.worker),
        "eq1_min_slack_ms": float(eq1["slack_s"].min() * 1e3),
        "eq1_layers_fitting": int(eq1["fits"].sum()),
        "memory_main_gb": mem["main"] / GB,
        "memory_shadow_gb": mem["shadow"] / GB,
        "memory_worker_gb": mem["worker"] / GB,
        "memory_odmoe_total_gb": mem["odmoe_total"] / GB,
        "memory_cached_total_gb": mem["cached_total"] / GB,
        "workers_for_95pct_of_best": float(enough["value"].min()) if len(enough) else math.nan,
        "recall_where_cacheless_matches_offload": pays,
    }


def _row(system: str, seed: int, ttft: float, decode: float, P: int, N: int, recall: float) -> dict:
    return {
        "system": system,
        "seed": seed,
        "prompt_len": P,
        "output_len": N,
        "ttft_s": ttft,
        "decode_s": decode,
        "decode_tok_s": (N - 1) / decode,
        "output_tok_s": N / (ttft + decode),
        "recall_or_hit_rate": recall,
    }
