"""Figures of the discrete-event simulator, drawn from a run directory's CSV files only.

``plot_gantt``: Fig. 2-style timing diagram (main, shadow, each worker's loads and compute) of the recorded decode
iterations; ``plot_eq1``: Eq. 1 budget versus load time per layer; ``plot_whatif``: decode speed versus workers,
link bandwidth, worker expert format and recall, with the physical I/O bound; ``plot_table2``, ``plot_fig8``,
``plot_periods``: the paper comparisons of ``+exp=sim_paper``.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

KIND_COLORS = {
    "M": "#4c72b0",
    "head": "#1b3a6b",
    "shared": "#8da0cb",
    "S": "#55a868",
    "load": "#dd8452",
    "reload": "#c44e52",
    "compute": "#8172b3",
    "align": "#937860",
}


def _resource_order(name: str) -> tuple:
    if name == "main":
        return (0, 0)
    if name == "shadow":
        return (1, 0)
    if name == "net":
        return (3, 0)
    m = re.match(r"worker (\d+)", name)
    return (2, int(m.group(1)) if m else 0)


def plot_gantt(csv: str | Path, out: str | Path, first_layer: int = 0, layers: int = 10) -> Path:
    """One panel per recorded decode iteration, times in ms from the iteration's first main-node step; only spans
    of layers ``first_layer .. first_layer + layers - 1`` (plus head and alignment) are drawn."""
    df = pd.read_csv(csv)
    df = df[df["iteration"] >= 0]
    its = sorted(df["iteration"].unique())
    fig, axes = plt.subplots(
        len(its), 1, figsize=(11, 2.2 + 0.35 * df["resource"].nunique() * len(its)), squeeze=False
    )
    last = first_layer + layers
    for ax, it in zip(axes[:, 0], its, strict=True):
        part = df[df["iteration"] == it]
        t0 = part.loc[part["resource"] == "main", "start_s"].min()
        window = part[((part["layer"] >= first_layer) & (part["layer"] < last)) | (part["layer"] < 0)]
        main_end = window.loc[(window["resource"] == "main") & (window["layer"] >= 0), "end_s"].max()
        window = window[window["start_s"] <= main_end + 1e-9] if len(window) else window
        resources = sorted(window["resource"].unique(), key=_resource_order)
        span = max(1e-9, (main_end - t0) * 1e3)
        for y, res in enumerate(resources):
            rows = window[window["resource"] == res]
            for kind, part in rows.groupby("kind"):
                bars = list(
                    zip((part["start_s"] - t0) * 1e3, (part["end_s"] - part["start_s"]) * 1e3, strict=True)
                )
                ax.broken_barh(
                    bars,
                    (y - 0.4, 0.8),
                    facecolors=KIND_COLORS.get(kind, "grey"),
                    edgecolor="white",
                    linewidth=0.5,
                )
            for row in rows[
                (rows["layer"] >= 0) & ((rows["end_s"] - rows["start_s"]) * 1e3 > 0.03 * span)
            ].itertuples():
                x = ((row.start_s + row.end_s) / 2 - t0) * 1e3
                ax.text(x, y, str(row.layer + 1), ha="center", va="center", fontsize=6, color="white")
        ax.set_yticks(range(len(resources)), resources, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(
            f"decode iteration {it + 1} (layers {first_layer + 1}-{last}; label = layer)", fontsize=9
        )
        ax.set_xlabel("ms")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLORS.values()]
    fig.legend(
        handles, list(KIND_COLORS), ncol=len(KIND_COLORS), loc="lower center", fontsize=7, frameon=False
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return Path(out)


def plot_eq1(csv: str | Path, out: str | Path) -> Path:
    df = pd.read_csv(csv)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    x = df["moe_layer"] + 1
    ax.bar(x, df["budget_s"] * 1e3, color="#4c72b0", alpha=0.6, label="Eq. 1 budget NG t^M + (NG-1) t^W")
    ax.plot(x, df["window_s"] * 1e3, "k_", markersize=10, label="window (+ hop to the worker)")
    ax.plot(x, df["load_s"] * 1e3, "o-", color="#c44e52", label="expert load time")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("ms")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return Path(out)


SWEEP_LABELS = {
    "workers": "worker nodes",
    "h2d_gbps": "host->GPU bandwidth per worker (GB/s)",
    "worker_format": "worker expert format",
    "recall": "predictor recall",
}


def plot_whatif(csv: str | Path, out: str | Path) -> Path:
    df = pd.read_csv(csv)
    sweeps = [s for s in SWEEP_LABELS if s in set(df["sweep"])]
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 3.4), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps, strict=True):
        part = df[df["sweep"] == sweep]
        cat = sweep == "worker_format"
        x = np.arange(len(part)) if cat else part["value"].astype(float).to_numpy()
        ax.plot(x, part["odmoe_tok_s"], "o-", label="OD-MoE (simulated)")
        ax.plot(
            x, part["io_bound_tok_s"], "--", color="k", label="I/O bound: all activated experts over W links"
        )
        ax.plot(x, part["compute_path_tok_s"], ":", color="grey", label="compute + network path")
        ax.axhline(part["cached_tok_s"].iloc[0], color="#55a868", lw=1, label="fully cached")
        ax.axhline(part["offload_tok_s"].iloc[0], color="#c44e52", lw=1, label="single-GPU offload")
        if cat:
            ax.set_xticks(x, part["value"].astype(str))
        top = max(part["compute_path_tok_s"].max(), part["cached_tok_s"].max()) * 1.4
        ax.set_ylim(0, top)
        ax.set_xlabel(SWEEP_LABELS[sweep])
        ax.set_ylabel("decode tok/s")
    axes[0, 0].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return Path(out)


def plot_table2(csv: str | Path, out: str | Path) -> Path:
    df = pd.read_csv(csv)
    metrics = list(dict.fromkeys(df["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        part = df[df["metric"] == metric]
        labels = [f"{s}\n{w}" for s, w in zip(part["system"], part["workload"], strict=True)]
        x = np.arange(len(part))
        ax.bar(x - 0.2, part["paper"], 0.4, label="paper")
        ax.bar(x + 0.2, part["sim"], 0.4, label="simulated")
        ax.set_xticks(x, labels, fontsize=5, rotation=90)
        ax.set_title(metric, fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return Path(out)


def plot_fig8(csv: str | Path, out: str | Path) -> Path:
    df = pd.read_csv(csv)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = df["case"].to_numpy()
    ax.bar(x - 0.2, df["paper_tok_s"], 0.4, label="paper (read from Fig. 8)")
    ax.bar(x + 0.2, df["sim_tok_s"], 0.4, yerr=df["sim_std"], label="simulated", capsize=2)
    for xi, r, src in zip(x, df["recall"], df["recall_source"], strict=True):
        label = "no prediction" if np.isnan(r) else f"r={r:.3f}\n{src.split(':')[0]}"
        ax.text(xi + 0.2, 0.1, label, ha="center", fontsize=6, color="white")
    ax.set_xticks(x, [f"case {c}" for c in x])
    ax.set_ylabel("decode tok/s (16, 256)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return Path(out)


def plot_periods(csv: str | Path, out: str | Path) -> Path:
    """Fig. 9/10 companions: timing-only speed and break-even recall per KV period, per worker GPU."""
    df = pd.read_csv(csv)
    df = df[df["token_period"].astype(str) == "1"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for (workers, part), color in zip(df.groupby("workers", sort=False), ("C0", "C1", "C2"), strict=False):
        x = np.arange(len(part))
        axes[0].plot(x, part["tok_s"], "o-", color=color, label=f"{workers} workers")
        if "tok_s_measured_recall" in part and part["tok_s_measured_recall"].notna().any():
            axes[0].plot(
                x, part["tok_s_measured_recall"], "s--", color=color, label=f"{workers}, measured recall"
            )
        axes[1].plot(x, part["break_even_recall"], "o-", color=color, label=f"{workers} workers")
        for ax in axes:
            ax.set_xticks(x, part["kv_period"].astype(str))
            ax.set_xlabel("KV period (token period 1)")
    axes[0].set_ylabel("decode tok/s at recall of T1_KV1")
    axes[1].set_ylabel("recall needed to beat T1_KV1")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return Path(out)
