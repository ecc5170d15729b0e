"""Table 2 as markdown, the measured values beside the paper's (PAPER.md §9.6-9.7).

A measured row is one (system, executor, workload). The executor is ``engine`` (the single-process
offload engine of ``baselines/``) or ``runtime`` (OD-MoE's multi-process runtime and its fully cached
reference, ``odmoe/runtime/cached.py``). Every executor times on the run's one clock (:data:`CLOCKS`); the
fully cached model runs on each executor a run needs (a consistency check: the two should agree) and
every other system is compared with the one on its own executor. Columns are keyed by :func:`label`: the system's name, suffixed with the executor
when it is not the system's own (``cached_runtime``).
"""

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
# what each re-implementation does differently from the original, and why (docs/baselines.md)
DEVIATIONS = {
    "cached": "one device instead of 8 GPUs: the embedded model fits on one",
    "cpu_only": "fp32 PyTorch on the host instead of llama.cpp's quantized CPU kernels (no llama.cpp here)",
    "mixtral_offloading": "HQQ dequantized then fp32 matmul in PyTorch, not fused Triton kernels (no GPU "
    "kernel on a CPU testbed); router and norms fp32, not fp16 (the model is fp32)",
    "moe_infinity": "offline EAMs from teacher-forced calibration windows, not generated requests (one pass "
    "each); EAM matching in numpy on the host, not on the GPU",
    "hobbit": "PyTorch re-interpretation of a llama.cpp system with no public code: fp32/NF4 for FP16/INT4, "
    "cache-score weights equal (unpublished)",
    "adapmoe": "layer sensitivity by our Fisher derivation (calibration scripts unreleased, units may "
    "differ); HQQ dequantized then fp32 matmul, not Triton",
    "odmoe": "— (this toolkit's system)",
}
HOME = {"odmoe": "runtime"}  # a system's own executor; every other one's is the offload engine
# what each `clock` value of table2.csv means (odmoe/clock.py)
CLOCKS = {
    "measured": "every executor (each rank of the OD-MoE runtime, the offload engine, the fully cached model) "
    "keeps a virtual clock: compute is the executing thread's CPU time (by default at the reference host's "
    "speed, from a probe every 5 ms) times the profile's compute_scale, host->device copies and messages queue "
    "on the profile's links in virtual time, waits are V = max(V, t); nothing sleeps, so a descheduled "
    "executor is not charged (a neighbour sharing its core still slows it: docs/runtime.md, host invariance)",
    "modelled": "the same virtual clocks, with compute priced by the cost model (odmoe/costs.py) on the "
    "profile's devices at the model shape timing.shape; deterministic, the same on any host",
    "wall": "real elapsed time on real hardware (real CUDA copies and waits)",
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


def label(system: str, executor: str) -> str:
    """Column and summary key of a (system, executor): the system, suffixed when off its own executor."""
    return system if executor == HOME.get(system, "engine") else f"{system}_{executor}"


def with_paper(measured: pd.DataFrame) -> pd.DataFrame:
    """``measured`` with a ``label`` column and the paper's numbers of the same system and workload."""
    df = measured.merge(paper_table2(), on=["system", "prompt_len", "output_len"], how="left")
    df["label"] = [label(s, e) for s, e in zip(df["system"], df["executor"], strict=True)]
    return df


def columns(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(label, display name) of every measured column, in the paper's order, own executor first."""
    pairs = df[["system", "executor"]].drop_duplicates().itertuples(index=False)
    rank = lambda s: list(PAPER_NAMES).index(s) if s in PAPER_NAMES else len(PAPER_NAMES)  # noqa: E731 - plugins last
    order = sorted(pairs, key=lambda r: (rank(r.system), label(*r) != r.system))
    name = lambda s: PAPER_NAMES.get(s, s)  # noqa: E731 - a user's policy is shown by its own name
    return [(label(s, e), name(s) if label(s, e) == s else f"{name(s)} ({e})") for s, e in order]


def same_clock_fraction(df: pd.DataFrame, col: str = "decode_tps") -> pd.Series:
    """Mean ``col`` of each label over the mean of the fully cached model on the same executor."""
    mean = df.groupby("label")[col].mean()
    out = {}
    for (lab, executor), _ in df.groupby(["label", "executor"]):
        ref = label("cached", executor)
        out[lab] = mean[lab] / mean[ref] if ref in mean else float("nan")
    return pd.Series(out)


def _fmt(v, digits: int) -> str:
    return "—" if v is None or pd.isna(v) else f"{v:.{digits}f}"


def _metric_table(df: pd.DataFrame, cols, title: str, col: str, pcol: str, d: int) -> list[str]:
    lines = [f"## {title}", "", "| workload | " + " | ".join(name for _, name in cols) + " |"]
    lines.append("|---" * (len(cols) + 1) + "|")
    for (p, o), part in df.groupby(["prompt_len", "output_len"]):
        cells = []
        for lab, _ in cols:
            r = part[part["label"] == lab]
            cells.append("—" if r.empty else f"{_fmt(r[col].iloc[0], d)} ({_fmt(r[pcol].iloc[0], d)})")
        lines.append(f"| ({p},{o}) | " + " | ".join(cells) + " |")
    mean = df.groupby("label")[[col, pcol]].mean()
    cells = [f"{_fmt(mean.loc[lab, col], d)} ({_fmt(mean.loc[lab, pcol], d)})" for lab, _ in cols]
    return [*lines, "| average | " + " | ".join(cells) + " |", ""]


def markdown(measured: pd.DataFrame, note: str = "") -> str:
    """Per metric, a workload x system table of 'measured (paper)' cells; clocks, quality and ordering."""
    df = with_paper(measured)
    cols = columns(df)
    names = dict(cols)
    lines = ["# Table 2 — measured (paper)", ""]
    if note:
        lines += [note, ""]
    lines += [
        "## Clocks and deviations",
        "",
        "| column | executor | clock | hardware profile | timing emulated | deviations from the original |",
    ]
    lines.append("|---|---|---|---|---|---|")
    first = df.groupby("label").first()
    for lab, name in cols:
        r = first.loc[lab]
        lines.append(
            f"| {name} | {r.executor} | {r.clock} | {r.hardware} | {bool(r.timing_emulated)} | "
            f"{DEVIATIONS.get(r.system, '—')} |"
        )
    lines.append("")
    lines += [f"- `{c}`: {CLOCKS[c]}." for c in dict.fromkeys(df["clock"])]
    lines += [
        "",
        "Every row is timed on the clock above; each system is also given as a share of the fully cached "
        "model on its own executor (the share table below).",
        "",
    ]
    for title, col, pcol, d in (
        ("TTFT (ms)", "ttft_ms", "paper_ttft_ms", 1),
        ("Decoding throughput (tok/s)", "decode_tps", "paper_decode_tps", 2),
        ("Output throughput, prefill + decode (tok/s)", "output_tps", "paper_output_tps", 2),
        ("Peak device memory (MB measured; paper GB)", "peak_device_mb", "paper_memory_gb", 2),
    ):
        lines += _metric_table(df, cols, title, col, pcol, d)
    share = same_clock_fraction(df)
    paper = (
        df.groupby("label")["paper_decode_tps"].mean()
        / paper_table2().query("system == 'cached'").paper_decode_tps.mean()
    )
    lines += ["## Decoding throughput as a share of the fully cached model on the same clock", ""]
    lines += ["| system | measured | paper |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(share[lab], 3)} | {_fmt(paper[lab], 3)} |" for lab, name in cols]
    lines += ["", "## Answer agreement with the fp32 reference and held-out perplexity", ""]
    lines += [
        "| system | agreement (share of tokens) | perplexity | lossy | hit rate | stall s/request |",
        "|---|---|---|---|---|---|",
    ]
    q = df.groupby("label").agg(
        agreement=("agreement", "mean"),
        perplexity=("perplexity", "mean"),
        lossy=("lossy", "first"),
        hit_rate=("hit_rate", "mean"),
        stall_s=("stall_s", "mean"),
    )
    for lab, name in cols:
        r = q.loc[lab]
        lines.append(
            f"| {name} | {r.agreement:.3f} | {_fmt(r.perplexity, 3)} | {bool(r.lossy)} | "
            f"{_fmt(r.hit_rate, 3)} | {_fmt(r.stall_s, 3)} |"
        )
    if q.perplexity.isna().any():
        lines += [
            "",
            "Perplexity — : not measured. The runtime's rows (OD-MoE, and the fully cached model run "
            "beside it) compute the fp32 model exactly (tokens and logits checked against it in "
            "tests/test_runtime.py), so their perplexity is the fully cached model's.",
        ]
    if "calibration" in df and df["calibration"].notna().any():
        lines += ["", "## Offline calibration (calibration split, disjoint from the evaluation prompts)", ""]
        cal = df.dropna(subset=["calibration"]).groupby("label")["calibration"].first()
        lines += [f"- {names[lab]}: {cal[lab]}" for lab, _ in cols if lab in cal.index]
    order = share.sort_values(ascending=False).index
    paper_order = [lab for lab in paper.dropna().sort_values(ascending=False).index if lab in PAPER_NAMES]
    lines += [
        "",
        "## Ordering by decoding throughput as a share of the fully cached model on the same clock",
        "",
    ]
    lines += [
        f"- measured: {' > '.join(names[lab] for lab in order if pd.notna(share[lab]))}",
        f"- paper:    {' > '.join(names[lab] for lab in paper_order) or '(no paper numbers for these workloads)'}",
        "",
    ]
    return "\n".join(lines)
