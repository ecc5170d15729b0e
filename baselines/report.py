"""Table 2 as markdown, the measured values beside the paper's (PAPER.md §9.6-9.7)."""

from __future__ import annotations

import pandas as pd

WORKLOADS = [(16, 64), (16, 256), (128, 64), (128, 256)]
# the paper's column for each system (OD-MoE's Table 2; "Transformers" = fully cached, "llama.cpp" = CPU-only)
PAPER_NAMES = {
    "cached": "Transformers",
    "cpu_only": "llama.cpp",
    "mixtral_offloading": "Mixtral-Offloading",
    "moe_infinity": "MoE-Infinity",
    "hobbit": "HOBBIT",
    "adapmoe": "AdapMoE",
    "odmoe": "OD-MoE",
}
_SYS = ["mixtral_offloading", "moe_infinity", "hobbit", "adapmoe", "cached", "cpu_only", "odmoe"]
_TTFT = [
    [1727.81, 5521.63, 5456.37, 1345.12, 385.52, 2025.10, 1349.78],
    [1705.15, 5560.34, 5467.42, 1428.23, 386.86, 2008.60, 1340.89],
    [1967.16, 5819.49, 5898.92, 1343.96, 447.43, 6592.81, 3150.87],
    [1979.81, 7573.27, 5896.04, 1430.69, 448.16, 6527.13, 3135.85],
]
_DECODE = [
    [2.26, 0.68, 0.78, 3.14, 4.90, 0.85, 3.67],
    [2.26, 0.68, 0.79, 3.15, 4.87, 0.82, 3.65],
    [2.22, 0.70, 0.79, 3.11, 4.90, 0.81, 3.74],
    [2.21, 0.69, 0.78, 3.12, 4.89, 0.81, 3.71],
]
_OUTPUT = [
    [2.16, 0.66, 0.74, 2.99, 4.84, 0.84, 3.41],
    [2.24, 0.67, 0.78, 2.98, 4.86, 0.82, 3.54],
    [2.11, 0.66, 0.74, 3.09, 4.81, 0.75, 3.09],
    [2.18, 0.68, 0.77, 3.08, 4.86, 0.78, 3.44],
]
_MEMORY_GB = [11, 21.5, 22, 8, 180, 0, 60]


def paper_table2() -> pd.DataFrame:
    """The paper's Table 2 (speed and GPU memory), one row per system and workload."""
    rows = []
    for w, (p, o) in enumerate(WORKLOADS):
        for s, name in enumerate(_SYS):
            rows.append(
                {
                    "system": name,
                    "prompt_len": p,
                    "output_len": o,
                    "paper_ttft_ms": _TTFT[w][s],
                    "paper_decode_tps": _DECODE[w][s],
                    "paper_output_tps": _OUTPUT[w][s],
                    "paper_memory_gb": _MEMORY_GB[s],
                }
            )
    return pd.DataFrame(rows)


def _fmt(v, digits: int) -> str:
    return "—" if v is None or pd.isna(v) else f"{v:.{digits}f}"


def markdown(measured: pd.DataFrame, note: str = "") -> str:
    """Per metric, a workload x system table of 'measured (paper)' cells, plus quality and ordering."""
    df = measured.merge(paper_table2(), on=["system", "prompt_len", "output_len"], how="left")
    systems = [s for s in PAPER_NAMES if s in set(df["system"])]
    lines = ["# Table 2 — measured (paper)", ""]
    if note:
        lines += [note, ""]
    for title, col, pcol, d in (
        ("TTFT (ms)", "ttft_ms", "paper_ttft_ms", 1),
        ("Decoding throughput (tok/s)", "decode_tps", "paper_decode_tps", 2),
        ("Output throughput, prefill + decode (tok/s)", "output_tps", "paper_output_tps", 2),
        ("Peak device memory (MB measured; paper GB)", "peak_device_mb", "paper_memory_gb", 2),
    ):
        lines += [f"## {title}", "", "| workload | " + " | ".join(PAPER_NAMES[s] for s in systems) + " |"]
        lines.append("|---" * (len(systems) + 1) + "|")
        for (p, o), part in df.groupby(["prompt_len", "output_len"]):
            cells = []
            for s in systems:
                r = part[part["system"] == s]
                cells.append("—" if r.empty else f"{_fmt(r[col].iloc[0], d)} ({_fmt(r[pcol].iloc[0], d)})")
            lines.append(f"| ({p},{o}) | " + " | ".join(cells) + " |")
        mean = df.groupby("system")[[col, pcol]].mean()
        lines.append(
            "| average | "
            + " | ".join(f"{_fmt(mean.loc[s, col], d)} ({_fmt(mean.loc[s, pcol], d)})" for s in systems)
            + " |"
        )
        lines.append("")
    lines += ["## Answer agreement with the fp32 reference and held-out perplexity", ""]
    lines += [
        "| system | agreement (share of tokens) | perplexity | lossy | hit rate | stall s/request |",
        "|---|---|---|---|---|---|",
    ]
    q = df.groupby("system").agg(
        agreement=("agreement", "mean"),
        perplexity=("perplexity", "mean"),
        lossy=("lossy", "first"),
        hit_rate=("hit_rate", "mean"),
        stall_s=("stall_s", "mean"),
    )
    for s in systems:
        r = q.loc[s]
        lines.append(
            f"| {PAPER_NAMES[s]} | {r.agreement:.3f} | {r.perplexity:.3f} | {bool(r.lossy)} | {r.hit_rate:.3f} | {r.stall_s:.3f} |"
        )
    lines += ["", "## Ordering by average decoding throughput", ""]
    mean = df.groupby("system")[["decode_tps", "paper_decode_tps"]].mean()
    ours = " > ".join(PAPER_NAMES[s] for s in mean["decode_tps"].sort_values(ascending=False).index)
    paper = " > ".join(PAPER_NAMES[s] for s in mean["paper_decode_tps"].sort_values(ascending=False).index)
    lines += [f"- measured: {ours}", f"- paper:    {paper}", ""]
    return "\n".join(lines)
