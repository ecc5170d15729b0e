"""Replay a single-device executor's record on simulated time: the offloading baselines and the fully
cached model in ``+exp=sim_measured``.

Input: what the executor did in one request (``odmoe.record``: where it issued each host->device copy,
which copies each layer waited for, how many experts it computed) and per-layer compute costs. Output:
TTFT, decode time and stall. The replay owns the schedule: copies queue on one FIFO link taking
``h2d_latency + bytes / h2d_bandwidth`` (the hardware profile), demand copies are issued one by one
over the lookups that follow the policy's plan, prefetches after its prefetch decisions, loads that found no room when the
expert the executor had computed before issuing them is done; a layer computes its experts in the
executor's order, each waiting (a stall) until its copy is there.

Costs are means, not the measured per-step times: per MoE layer, over the request's decode iterations,
the time up to the router (``t_main``), the policy's and the cache's time (``t_plan``, ``t_demand``,
``t_prefetch``) and the compute per expert
(total expert time / experts computed), and the step's tail; prefill costs are means over the
workload's requests (one prefill each). What this checks: that per-layer mean costs, the cache's
decisions and the link's FIFO schedule suffice to predict each system's end-to-end speed; the cache
policy itself is not re-simulated (that is ``odmoe/sim/offload.py``'s job at paper scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from odmoe.costs import Link
from odmoe.errors import OdmoeError

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class LayerCosts:
    """Mean costs of one phase: per MoE layer (``main``, ``plan``, ``demand``, ``prefetch``, ``expert``) and the tail."""

    main: dict[int, float]
    plan: dict[int, float]
    demand: dict[int, float]
    prefetch: dict[int, float]
    expert: dict[int, float]
    tail: float


def _phase(step: pd.Series) -> np.ndarray:
    return np.where(step.to_numpy() == 0, "prefill", "decode")


def mean_costs(layers: pd.DataFrame, steps: pd.DataFrame, phase: str) -> LayerCosts:
    """Mean costs of ``phase`` over every step of that phase in ``layers``/``steps`` (one or more requests)."""
    lay = layers[_phase(layers.step) == phase]
    st = steps[_phase(steps.step) == phase]
    if lay.empty or st.empty:
        raise OdmoeError(f"the record has no {phase} steps")
    by = lay.groupby("layer")
    sums = by[["t_experts", "computed"]].sum()
    expert = (sums.t_experts / sums.computed.where(sums.computed > 0)).fillna(0.0)
    return LayerCosts(
        main=by.t_main.mean().to_dict(),
        plan=by.t_plan.mean().to_dict(),
        demand=by.t_demand.mean().to_dict(),
        prefetch=by.t_prefetch.mean().to_dict(),
        expert=expert.to_dict(),
        tail=float(st.t_tail.mean()),
    )


@dataclass
class ReplayResult:
    ttft: float
    decode_time: float
    stall: float
    prefill_stall: float


def replay(
    layers: pd.DataFrame,
    steps: pd.DataFrame,
    transfers: pd.DataFrame,
    costs: dict[str, LayerCosts],
    bandwidth: float | None,
    latency: float = 0.0,
) -> ReplayResult:
    """One request (the rows of one ``request`` of each table) on ``costs`` (by phase) and the link."""
    if len(transfers) and not bandwidth:
        raise OdmoeError("the record has host->device copies but the hardware profile has no h2d_bandwidth")
    nbytes = dict(zip(transfers.transfer.astype(int), transfers.bytes, strict=True))
    link = Link(bandwidth or 1.0, setup=latency)
    arrival: dict[int, float] = {}

    def issue(ids, at: float) -> None:
        for i in ids:
            arrival[int(i)] = link.transfer(nbytes[int(i)], at)

    t = stall = 0.0
    ttft = prefill_stall = math.nan
    by_step = {s: g for s, g in layers.sort_index().groupby("step", sort=True)}
    for step in sorted(steps.step):
        c = costs["prefill" if step == 0 else "decode"]
        for row in by_step.get(step, layers.iloc[:0]).itertuples():
            t += c.main[row.layer] + c.plan[row.layer]
            for j, i in enumerate(row.demand):  # each lookup's bookkeeping precedes its copy
                issue([i], t + (j + 1) / len(row.demand) * c.demand[row.layer])
            t += c.demand[row.layer] + c.prefetch[row.layer]
            issue(row.prefetch, t)
            deferred = list(zip(row.deferred_after, row.deferred, strict=True))
            order = list(row.waits) if len(row.waits) else [-1] * int(row.computed)
            for done, i in enumerate(order):
                issue([d for after, d in deferred if after == done], t)
                ready = arrival[int(i)] if i >= 0 else 0.0
                stall += max(0.0, ready - t)
                t = max(t, ready) + c.expert[row.layer]
        t += c.tail
        if step == 0:
            ttft, prefill_stall = t, stall
    return ReplayResult(ttft, t - ttft, stall - prefill_stall, prefill_stall)
