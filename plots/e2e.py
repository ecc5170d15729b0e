"""Figures of ``+exp=e2e``, drawn from a run directory's CSV files only.

``table2(run_dir)``: decode throughput and TTFT per workload and system (paper Table 2 (i)), with
OD-MoE's critical-path lower bound. ``stalls(run_dir)``: OD-MoE's mean stall per MoE layer (late
departure shows as stalls on the first layers) and the distribution of the shadow's lead.
``memory(run_dir)``: measured peak device bytes per node against the analytic model.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _requests(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "requests.csv").drop_duplicates(
        ["system", "workload", "prompt_id"], keep="last"
    )


def table2(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    df = _requests(run_dir)
    workloads = list(dict.fromkeys(df.workload))
    systems = list(dict.fromkeys(df.system))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / (len(systems) + 1)
    x = np.arange(len(workloads))
    for i, s in enumerate(systems):
        g = df[df.system == s].groupby("workload").mean(numeric_only=True).reindex(workloads)
        a.bar(x + i * width, g.decode_tok_s, width, label=s)
        b.bar(x + i * width, g.ttft_s * 1e3, width, label=s)
        if s == "odmoe" and g.lower_bound_s.notna().any():
            bound = (g.output_len - 1) / g.lower_bound_s
            a.bar(
                x + len(systems) * width,
                bound,
                width,
                label="odmoe, zero-stall bound",
                color="none",
                edgecolor="k",
                hatch="//",
            )
    for ax, label in ((a, "decode tok/s"), (b, "TTFT (ms)")):
        ax.set_xticks(x + width * (len(systems) - 1) / 2, workloads)
        ax.set_xlabel("(prompt, output) tokens")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    a.legend(fontsize=7)
    fig.tight_layout()
    out = run_dir / "table2.png"
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def stalls(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    layers = pd.read_csv(run_dir / "layers.csv")
    layers = layers[layers.system == "odmoe"] if "system" in layers else layers
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    per = layers.groupby("layer")[["stall", "t_main", "t_worker"]].mean() * 1e3
    a.bar(per.index, per.stall, label="stall")
    a.plot(per.index, per.t_main, "k.-", label="t_main")
    a.plot(per.index, per.t_worker - per.stall, "C1.-", label="t_worker (no stall)")
    a.set_xlabel("MoE layer")
    a.set_ylabel("ms per decode iteration")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    req = _requests(run_dir)
    hist: dict[int, int] = {}
    for h in req[req.system == "odmoe"].lead_hist.dropna():
        for k, v in json.loads(h).items():
            hist[int(k)] = hist.get(int(k), 0) + v
    if hist:
        keys = sorted(hist)
        b.bar(keys, [hist[k] for k in keys])
    b.set_xlabel("shadow lead at the main node's router (MoE layers; < 0: behind)")
    b.set_ylabel("(iteration, layer) pairs")
    b.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "stalls.png"
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def memory(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    mem = pd.read_csv(run_dir / "memory.csv")
    emb = mem[mem.measured.notna()]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    labels = [f"{r.node}\n{r.workload}" for r in emb.itertuples()]
    x = np.arange(len(emb))
    ax.bar(x - 0.2, emb.measured / 1e6, 0.4, label="measured peak")
    ax.bar(x + 0.2, emb.model_bytes / 1e6, 0.4, label="model")
    ax.set_xticks(x, labels, fontsize=6)
    ax.set_ylabel("MB")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = run_dir / "memory.png"
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


if __name__ == "__main__":
    import sys

    for fn in (table2, stalls, memory):
        print(fn(sys.argv[1]))
