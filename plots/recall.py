"""Figures of SEP recall, drawn from a run directory's CSV files only.

``fig3(run_dir)``: recall (Eq. 2) vs output-token index, one panel per shadow precision (NF4, INT8,
FP16 as in the paper), one curve per alignment mode. ``fig6(run_dir)``: Eq. 3 recall over the
token-period x KV-period grid of ``+exp=alignment_periods``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

PANEL_ORDER = ("nf4", "int8", "fp16", "fp32")
LABELS = {
    "none": "no alignment",
    "token": "token alignment",
    "kv": "KV alignment",
    "token_kv": "token + KV alignment",
}


def _table(run_dir: Path, name: str, key: list[str]) -> pd.DataFrame:
    frame = pd.read_csv(run_dir / f"{name}.csv")
    return frame.drop_duplicates(subset=key, keep="last")


def fig3(run_dir: str | Path, smooth: int = 8) -> Path:
    """Per-token recall curves; a light line is Eq. 2 itself, the bold one its ``smooth``-token mean."""
    run_dir = Path(run_dir)
    tokens = _table(run_dir, "recall_tokens", ["precision", "alignment", "prompt_id", "n"])
    precisions = [p for p in PANEL_ORDER if p in set(tokens["precision"])]
    precisions += sorted(set(tokens["precision"]) - set(precisions))
    fig, axes = plt.subplots(
        1, len(precisions), figsize=(4.2 * len(precisions), 3.4), sharey=True, squeeze=False
    )
    for ax, precision in zip(axes[0], precisions, strict=True):
        part = tokens[tokens["precision"] == precision]
        for i, (mode, g) in enumerate(part.groupby("alignment", sort=False)):
            sums = g.groupby("n")[["hits", "slots"]].sum()
            per_n = sums["hits"] / sums["slots"]  # Eq. 2
            color = f"C{i}"
            ax.plot(per_n.index, per_n.to_numpy(), color=color, alpha=0.25, lw=0.8)
            rolled = sums.rolling(smooth, min_periods=1).sum()
            ax.plot(
                per_n.index,
                (rolled["hits"] / rolled["slots"]).to_numpy(),
                color=color,
                lw=1.8,
                label=f"{LABELS.get(mode, mode)} ({g['hits'].sum() / g['slots'].sum():.2%})",
            )
        ax.set_title(f"{precision.upper()} shadow")
        ax.set_xlabel("output token index n")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0][0].set_ylabel("recall (Eq. 2)")
    axes[0][0].set_ylim(0, 1.02)
    prompts = tokens["prompt_id"].nunique()
    fig.suptitle(
        f"SEP recall vs output token index ({prompts} prompts; bold: {smooth}-token window)", fontsize=10
    )
    fig.tight_layout()
    out = run_dir / "fig3.png"
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def _period_key(value) -> float:
    return np.inf if str(value) == "off" else float(value)


def fig6(run_dir: str | Path) -> Path:
    """Heat map of Eq. 3 recall by token period (rows) and KV period (columns)."""
    run_dir = Path(run_dir)
    runs = _table(run_dir, "recall_runs", ["precision", "alignment", "prompt_id"])
    runs = runs.astype({"token_period": str, "kv_period": str})
    sums = runs.groupby(["precision", "token_period", "kv_period"])[["hits", "slots"]].sum().reset_index()
    sums["recall"] = sums["hits"] / sums["slots"]
    precisions = sorted(set(sums["precision"]))
    fig, axes = plt.subplots(1, len(precisions), figsize=(5.2 * len(precisions), 4.4), squeeze=False)
    for ax, precision in zip(axes[0], precisions, strict=True):
        part = sums[sums["precision"] == precision]
        grid = part.pivot(index="token_period", columns="kv_period", values="recall")
        grid = grid.loc[sorted(grid.index, key=_period_key), sorted(grid.columns, key=_period_key)]
        values = grid.to_numpy(dtype=float)
        # the colour scale spans the grid's own range: recalls within a point of each other still read
        image = ax.imshow(values, vmin=np.nanmin(values), vmax=np.nanmax(values), cmap="viridis")
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(
                    j,
                    i,
                    f"{value:.3f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if image.norm(value) < 0.5 else "black",
                )
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(r) for r in grid.index])
        ax.set_xlabel("KV alignment period P_KV")
        ax.set_ylabel("token alignment period P_T")
        ax.set_title(f"{precision.upper()} shadow: recall (Eq. 3)")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    out = run_dir / "fig6.png"
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out
