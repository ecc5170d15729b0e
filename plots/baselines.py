"""Bar charts of Table 2 from ``table2.csv`` (``+exp=baselines``); the paper's values beside ours."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from baselines.report import PAPER_NAMES, paper_table2  # noqa: E402

METRICS = [
    ("ttft_ms", "paper_ttft_ms", "TTFT (ms)"),
    ("decode_tps", "paper_decode_tps", "decoding throughput (tok/s)"),
    ("output_tps", "paper_output_tps", "output throughput (tok/s)"),
    ("peak_device_mb", "paper_memory_gb", "peak device memory (MB; paper GB)"),
]


def plot_table2(csv: str | Path, out_dir: str | Path) -> list[Path]:
    """One figure per metric: bars per system grouped by workload, measured and (hatched) paper."""
    df = pd.read_csv(csv).merge(paper_table2(), on=["system", "prompt_len", "output_len"], how="left")
    systems = [s for s in PAPER_NAMES if s in set(df["system"])]
    loads = sorted({(int(p), int(o)) for p, o in zip(df["prompt_len"], df["output_len"], strict=False)})
    out = []
    for col, pcol, label in METRICS:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
        width = 0.8 / len(systems)
        for ax, c, title in ((axes[0], col, "measured"), (axes[1], pcol, "paper (Mixtral-8x7B)")):
            for i, s in enumerate(systems):
                vals = [
                    df[(df.system == s) & (df.prompt_len == p) & (df.output_len == o)][c].mean()
                    for p, o in loads
                ]
                ax.bar(np.arange(len(loads)) + i * width, vals, width, label=PAPER_NAMES[s])
            ax.set_xticks(np.arange(len(loads)) + 0.4 - width / 2, [f"({p},{o})" for p, o in loads])
            ax.set_title(title)
            ax.set_ylabel(label)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        path = Path(out_dir) / f"table2_{col}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out.append(path)
    q = df.groupby("system")[["agreement"]].mean().reindex(systems)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([PAPER_NAMES[s] for s in systems], q["agreement"])
    ax.set_ylabel("token agreement with fp32 reference")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    path = Path(out_dir) / "table2_agreement.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [*out, path]
