"""Closed-form companions of the schedule: Eq. 1 per layer, physical bounds, memory per node, inverse problems."""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd

from odmoe.costs import Formats
from odmoe.sim.distributed import Layout, ODMoEConfig
from odmoe.sim.shapes import FORMAT_BYTES, ModelShape


def eq1_budget(t_m: float, t_w: float, num_groups: int) -> float:
    """Eq. 1 with G read as the number of groups (PAPER.md §3.4): ``NG t^M + (NG - 1) t^W``."""
    return num_groups * t_m + (num_groups - 1) * t_w


def eq1_table(shape: ModelShape, costs, cfg: ODMoEConfig, ctx: int = 0) -> pd.DataFrame:
    """Eq. 1 checked per MoE layer, with the paper's step definitions and this model's steps.

    t^M of layer j: the outputs of layer j-1 travelling back to the main node plus the main node's compute up to
    layer j's router (the LM head too for the first MoE layer, whose window spans the token boundary);
    t^W of layer j: the hidden vector travelling to the group plus the expert step. The budget of layer j sums the
    NG t^M and NG - 1 t^W that separate the end of EC_{j-NG} (when its group's buffer frees) from the end of M_j;
    ``window`` adds the send hop after M_j, since the expert is needed when the hidden vector arrives: a load
    shorter than or equal to ``window`` never stalls under timely, correct predictions (tested exactly).
    Shared experts run on the main node while the workers compute and are assumed to finish first.
    """
    lay = Layout.of(shape, cfg)
    moe = shape.moe_layers
    hidden = costs.act_bytes(1)
    gs = len(lay.workers(0))
    send = gs * costs.wire(hidden) + costs.latency
    back = sum(costs.wire(m * hidden) for m in lay.share if m) + costs.latency
    m_step, w_step = [], []
    for j, layer in enumerate(moe):
        prev = moe[j - 1] if j else moe[-1] - shape.num_layers
        main = sum(costs.main(i % shape.num_layers, 1, ctx) for i in range(prev + 1, layer + 1))
        m_step.append(back + main + (costs.head(1) if j == 0 else 0.0))
        w_step.append(send + costs.expert(lay.experts_per_worker, 1, layer=layer))
    ng, lm = lay.num_groups, len(moe)
    load = lay.experts_per_worker * costs.load()
    rows = []
    for j, layer in enumerate(moe):
        budget = sum(m_step[(j - q) % lm] for q in range(ng)) + sum(
            w_step[(j - q) % lm] for q in range(1, ng)
        )
        rows.append(
            {
                "moe_layer": j,
                "layer": layer,
                "group": j % ng,
                "t_M_s": m_step[j],
                "t_W_s": w_step[j],
                "budget_s": budget,
                "window_s": budget + send,
                "load_s": load,
                "slack_s": budget + send - load,
                "fits": load <= budget + send,
            }
        )
    return pd.DataFrame(rows)


def io_bound_tok_s(shape: ModelShape, workers: int, h2d_bandwidth: float, fmt: str = "fp32") -> float:
    """Perfect prediction, every activated expert copied once over one of ``workers`` links: the decode ceiling."""
    per_token = shape.num_moe_layers * shape.top_k * shape.expert_bytes(fmt)
    return workers * h2d_bandwidth / per_token


def node_memory(
    shape: ModelShape, formats: Formats, cfg: ODMoEConfig, positions: int, shadow_kv: str = "fp16"
) -> dict[str, float]:
    """Bytes per node: weights plus KV for ``positions`` positions (activations and CUDA context left out).

    Main: every non-expert weight in ``formats.main`` and the full-precision KV cache. Shadow: the whole model in
    ``formats.shadow`` (int8 with its scales; embeddings counted at the same width) and a ``shadow_kv`` cache
    (PAPER.md §11 item 4). Worker: ``buffers`` layers' worth of its expert share.
    """
    lay = Layout.of(shape, cfg)
    kv = positions * shape.num_layers * shape.kv_per_token
    main = shape.nonexpert_params * FORMAT_BYTES[formats.main] + kv * FORMAT_BYTES[formats.kv]
    experts = shape.num_moe_layers * shape.num_experts
    shadow = (
        experts * shape.expert_bytes(formats.shadow) + shape.nonexpert_params * FORMAT_BYTES[formats.shadow]
    )
    shadow += kv * FORMAT_BYTES[shadow_kv]
    worker = cfg.buffers * lay.experts_per_worker * shape.expert_bytes(formats.worker)
    cached = shape.total_params * FORMAT_BYTES[formats.main] + kv * FORMAT_BYTES[formats.kv]
    return {
        "main": main,
        "shadow": shadow,
        "worker": worker,
        "odmoe_total": main + shadow + lay.num_workers * worker,
        "cached_total": cached,
    }


def solve_increasing(
    f: Callable[[float], float], target: float, lo: float, hi: float, tol: float = 1e-4
) -> float:
    """x in [lo, hi] with f(x) = target for a non-decreasing f (Illinois regula falsi; NaN when out of range)."""
    flo, fhi = f(lo) - target, f(hi) - target
    if flo > 0 or fhi < 0:
        return math.nan
    side = 0
    for _ in range(40):
        x = hi - fhi * (hi - lo) / (fhi - flo) if fhi != flo else (lo + hi) / 2
        fx = f(x) - target
        if abs(fx) <= tol * abs(target) or hi - lo < 1e-9:
            return x
        if fx < 0:
            lo, flo = x, fx
            if side == -1:
                fhi /= 2
            side = -1
        else:
            hi, fhi = x, fx
            if side == 1:
                flo /= 2
            side = 1
    return x
