"""Figures of ``+exp=predictors``, drawn from the run directory's CSV files only.

``recall_vs_d(run_dir)``: Eq. 3 recall vs lookahead d, one curve per predictor, with d = G-1 marked
(stars at d = 0: the same-layer design point of the families that have one).
``cache_hits(run_dir)``: cache-hit rate vs experts cached per layer, one curve per (policy, prefetch),
with the cacheless SEP recalls as horizontal references.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

# tab10 without its grey (kept for the random / load-after-routing references), then Dark2
PALETTE = [plt.get_cmap("tab10")(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)] + [
    plt.get_cmap("Dark2")(i) for i in range(8)
]
STYLE = {
    "oracle": ("k", ":"),
    "random": ("0.5", "--"),
    "load_after_routing": ("0.3", "-."),
}


def recall_vs_d(run_dir: str | Path, lookahead_mark: int | None = None) -> Path:
    run_dir = Path(run_dir)
    df = pd.read_csv(run_dir / "recall_by_d.csv")
    fig, ax = plt.subplots(figsize=(9.0, 4.6))
    for i, (name, g) in enumerate(df.groupby("predictor", sort=False)):
        g = g.sort_values("d")
        color, ls = STYLE.get(name, (PALETTE[i % len(PALETTE)], "-"))
        ahead, same = g[g["d"] >= 1], g[g["d"] == 0]
        marker = "o" if len(ahead) == 1 else "."
        ax.plot(ahead["d"], ahead["recall"], color=color, ls=ls, marker=marker, label=name)
        if len(same):  # a same-layer family's own design point (d = 0), not joined to its curve
            ax.plot(same["d"], same["recall"], color=color, ls="none", marker="*", ms=9)
    if (df["d"] == 0).any():
        ax.text(0, 0.02, " * d = 0: same layer", color="0.4", fontsize=8)
    if lookahead_mark:
        ax.axvline(lookahead_mark, color="0.7", lw=1)
        ax.text(lookahead_mark, 0.02, f" d = G-1 = {lookahead_mark}", color="0.4", fontsize=8)
    ax.set_xlabel("lookahead d (MoE layers ahead of the newest routed layer)")
    ax.set_ylabel("recall (Eq. 3)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Expert-activation recall vs lookahead (same model, prompts, metric)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    out = run_dir / "recall_vs_d.png"
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def cache_hits(run_dir: str | Path, sep_d: int = 1) -> Path:
    run_dir = Path(run_dir)
    df = pd.read_csv(run_dir / "cache_hits.csv")
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    for i, ((policy, prefetch), g) in enumerate(df.groupby(["policy", "prefetch"], sort=False)):
        g = g.sort_values("capacity")
        ls = "--" if prefetch == "none" else "-"
        ax.plot(
            g["capacity"],
            g["hit_rate"],
            ls=ls,
            marker="o",
            color=f"C{i % 10}",
            label=f"{policy} + {prefetch}",
        )
    recall_path = run_dir / "recall_by_d.csv"
    if recall_path.exists():
        rec = pd.read_csv(recall_path)
        sep = rec[rec["predictor"].str.startswith("sep_") & (rec["d"] == sep_d)]
        for i, row in enumerate(sep.itertuples()):
            ax.axhline(
                row.recall,
                color=f"{0.3 + 0.2 * i:.1f}",
                lw=0.9,
                ls=":",
                label=f"{row.predictor}, no cache (= recall)",
            )
    ax.set_xticks(sorted(df["capacity"].unique()))
    ax.set_xlabel("experts cached per layer (c)")
    ax.set_ylabel("cache-hit rate (decode)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Cache comparators on the same traces")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    out = run_dir / "cache_hit_vs_size.png"
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out
