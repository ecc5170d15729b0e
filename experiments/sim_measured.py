"""``+exp=sim_measured``: the simulator driven by a measured run, against that run's own speed (issue 7, 4a).

Inputs (all three from the OD-MoE runtime; see docs/simulator.md): per-layer times, a recall trace, and the
measured requests. Each measured request is re-simulated with the measured times and hits; the table compares
TTFT, decode and output throughput.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from odmoe.errors import OdmoeError
from odmoe.results import Run
from odmoe.sim import recall as rc
from odmoe.sim.config import costs_of, formats_of, hardware_of, odmoe_of, shape_of
from odmoe.sim.distributed import simulate_request

NEEDED = ("layer_times", "recall_trace", "measured")
COLUMNS = ("prompt_len", "output_len", "ttft_s", "decode_tok_s", "output_tok_s")


def run(cfg, run: Run) -> dict:
    e = cfg.exp
    missing = [k for k in NEEDED if not e.get(k)]
    if missing:
        raise OdmoeError(
            f"+exp=sim_measured needs the OD-MoE runtime's measured outputs ({', '.join('exp.' + k for k in missing)}); "
            "the runtime does not exist yet, so this validation cannot run yet (formats: docs/simulator.md)"
        )
    hw = hardware_of(cfg)
    shape = shape_of(e.model, cfg.model)
    ocfg = odmoe_of(e.odmoe, hw)
    costs = costs_of(shape, hw, formats_of(e.formats), e.layer_times)
    hits_all = rc.load_hits(e.recall_trace, shape.top_k)
    path = Path(e.measured)
    if not path.exists():
        raise OdmoeError(f"no measured requests at {path}; pass the runtime's requests CSV as exp.measured")
    measured = pd.read_csv(path)
    absent = [c for c in COLUMNS if c not in measured]
    if absent:
        raise OdmoeError(f"{path}: missing columns {', '.join(absent)}; need {', '.join(COLUMNS)}")
    table = run.table("measured_vs_sim", key=["request", "metric"])
    for idx, row in measured.iterrows():
        P, N = int(row["prompt_len"]), int(row["output_len"])
        hits = rc.fit(hits_all, N - 1, shape.num_moe_layers)
        sim = simulate_request(shape, costs, ocfg, P, N, hits)
        for metric, value in (
            ("ttft_s", sim.ttft),
            ("decode_tok_s", sim.decode_tok_s),
            ("output_tok_s", sim.output_tok_s),
        ):
            if not table.done(request=idx, metric=metric):
                m = float(row[metric])
                table.add(
                    {
                        "request": idx,
                        "prompt_len": P,
                        "output_len": N,
                        "metric": metric,
                        "measured": m,
                        "sim": value,
                        "err_pct": 100 * (value - m) / m,
                    }
                )
    df = table.frame()
    out = {"model": shape.name, "requests": len(measured), "recall": rc.recall_of(hits_all, shape.top_k)}
    for metric, part in df.groupby("metric"):
        out[f"{metric}_max_abs_err_pct"] = float(part["err_pct"].abs().max())
        out[f"{metric}_mean_err_pct"] = float(part["err_pct"].mean())
    return out
