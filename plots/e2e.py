"""Figures of ``+exp=e2e``, drawn from a run directory's CSV files only.

``table2(run_dir)``: per Table 2 metric, bars per system and workload, measured beside the paper's
(``table2.csv``; OD-MoE's zero-stall bound hatched on the decode chart), and the answer agreement.
``stalls(run_dir)``: OD-MoE's mean stall per MoE layer (late departure shows as stalls on the first
layers) and the distribution of the shadow's lead. ``memory(run_dir)``: OD-MoE's measured peak
device bytes per node against the analytic model. ``python -m plots.e2e RUN_DIR`` draws them all.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from baselines.report import columns, with_paper  # noqa: E402

METRICS = [
    ("ttft_ms", "paper_ttft_ms", "TTFT (ms)"),
    ("decode_tps", "paper_decode_tps", "decoding throughput (tok/s)"),
    ("output_tps", "paper_output_tps", "output throughput (tok/s)"),
    ("peak_device_mb", "paper_memory_gb", "peak device memory (MB; paper GB)"),
]
MEASURED = "measured (engine: CPU-time clock; runtime: wall clock; table2.md)"


def _save(fig, path: Path, bottom: float = 0.0) -> Path:
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table2(run_dir: str | Path) -> list[Path]:
    """``table2_<metric>.png`` for the four speed and memory metrics and ``table2_agreement.png``."""
    run_dir = Path(run_dir)
    df = with_paper(pd.read_csv(run_dir / "table2.csv"))
    cols = columns(df)
    loads = sorted({(int(p), int(o)) for p, o in zip(df["prompt_len"], df["output_len"], strict=True)})
    x = np.arange(len(loads))
    width = 0.8 / (len(cols) + 1)

    def values(lab: str, c: str) -> list[float]:
        return [
            df[(df.label == lab) & (df.prompt_len == p) & (df.output_len == o)][c].mean() for p, o in loads
        ]

    out = []
    for col, pcol, ylabel in METRICS:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
        for ax, c, title in ((axes[0], col, MEASURED), (axes[1], pcol, "paper (Mixtral-8x7B)")):
            for i, (lab, name) in enumerate(cols):
                if c == pcol and lab not in set(df.system):
                    continue  # the paper has one column per system
                ax.bar(x + i * width, values(lab, c), width, label=name, color=f"C{i}")
            ax.set_xticks(x + width * len(cols) / 2, [f"({p},{o})" for p, o in loads])
            ax.set_title(title)
            ax.set_ylabel(ylabel)
        if col == "decode_tps" and "odmoe" in set(df.label) and df.decode_tps_bound.notna().any():
            axes[0].bar(
                x + len(cols) * width,
                values("odmoe", "decode_tps_bound"),
                width,
                label="OD-MoE zero-stall bound",
                color="none",
                edgecolor="k",
                hatch="//",
            )
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=7)
        out.append(_save(fig, run_dir / f"table2_{col}.png", bottom=0.14))
    q = df.groupby("label")["agreement"].mean()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([name for _, name in cols], [q[lab] for lab, _ in cols], color=[f"C{i}" for i in range(len(cols))])
    ax.set_ylabel("token agreement with fp32 reference")
    ax.tick_params(axis="x", labelrotation=30)
    return [*out, _save(fig, run_dir / "table2_agreement.png")]


def _requests(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "requests.csv").drop_duplicates(
        ["system", "workload", "prompt_id"], keep="last"
    )


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
    return _save(fig, run_dir / "stalls.png")


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
    return _save(fig, run_dir / "memory.png")


def draw_all(run_dir: str | Path) -> list[Path]:
    """Every figure the run directory has data for (OD-MoE's only when OD-MoE ran)."""
    run_dir = Path(run_dir)
    out = table2(run_dir)
    if (run_dir / "layers.csv").exists():
        out.append(stalls(run_dir))
    mem = run_dir / "memory.csv"
    if mem.exists() and pd.read_csv(mem).measured.notna().any():
        out.append(memory(run_dir))
    return out


if __name__ == "__main__":
    import sys

    for path in draw_all(sys.argv[1]):
        print(path)
