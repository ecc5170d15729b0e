"""What a single-device executor did in one request, step by step and layer by layer.

Written by the offload engine (``baselines/engine.py``) and by the fully cached model
(``odmoe/runtime/cached.py``); read by the simulator's replay (``odmoe/sim/replay.py``,
``+exp=sim_measured``). It holds the executor's *decisions* (which copies it issued where, which copies
each layer waited for, how many experts it computed) and its measured *compute* times; never its
stalls or end-to-end times, which the replay predicts and the validation compares.

Per forward step (prefill is step 0, decode iteration n is step n) and MoE layer:

==========  ========================================================================================
t_main      compute time from the previous MoE layer's end (or the step's start) to this layer's
            router output: attention, norms, router, dense layers in between
t_plan      the policy's plan (which experts at which precision), before the demand loads are issued
t_demand    looking up the planned experts and issuing the demand loads of the misses
t_prefetch  the policy's prefetch decisions (gates, EAM lookups) and their loads
t_experts   the expert computations and their sum (stalls excluded)
computed    experts computed (a (expert, format) pair counts once)
demand      link transfers issued for this layer's misses (write-backs included), in issue order
prefetch    link transfers issued by the policy's prefetch after the demand loads
deferred    demand loads that found no room at first, issued while the layer computes
deferred_after  for each of those transfers, how many experts the layer had computed when it was issued
waits       per computed expert in compute order, the transfer of this request that brought it (-1:
            resident before the request); empty when the executor has no link (all resident)
==========  ========================================================================================

Per step: ``t_tail`` (after the last MoE layer: final norm, LM head) and ``extra`` (0; kept for old records). Per transfer: bytes and kind (``demand``, ``prefetch``, ``writeback``).
Times are on the executor's clock (``odmoe/clock.py``), stalls excluded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

COLUMNS = {"steps": ("step", "t_tail", "extra"), "transfers": ("transfer", "bytes", "kind")}


@dataclass
class ExecutorRecord:
    layers: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    transfers: list[dict] = field(default_factory=list)
    step: int = 0

    def transfer(self, nbytes: int, kind: str) -> int:
        """Note a link transfer; returns its id (issue order within the request)."""
        self.transfers.append({"transfer": len(self.transfers), "bytes": int(nbytes), "kind": kind})
        return len(self.transfers) - 1

    def layer(self, **row) -> None:
        self.layers.append({"step": self.step, **row})

    def end_step(self, t_tail: float, extra: float) -> None:
        self.steps.append({"step": self.step, "t_tail": t_tail, "extra": extra})
        self.step += 1


def save_records(records: list[tuple[str, ExecutorRecord]], path: Path) -> None:
    """One parquet per table (``<path>.layers/steps/transfers.parquet``), a ``request`` column naming each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for table in ("layers", "steps", "transfers"):
        frames = [
            pd.DataFrame(getattr(r, table), columns=COLUMNS.get(table)).assign(request=rid)
            for rid, r in records
        ]
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        tmp = path.with_name(f"{path.name}.{table}.tmp")
        df.to_parquet(tmp, index=False)
        tmp.replace(path.with_name(f"{path.name}.{table}.parquet"))


def load_records(path: Path) -> dict[str, pd.DataFrame]:
    return {
        t: pd.read_parquet(path.with_name(f"{path.name}.{t}.parquet"))
        for t in ("layers", "steps", "transfers")
    }
