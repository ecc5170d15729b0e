"""Measure SEP recall for a grid of shadow precisions x alignment modes over a prompt set.

Shared by ``+exp=recall`` and ``+exp=alignment_periods``. Per prompt the full model is decoded
once (``record_reference``) and every configuration not yet done is replayed against that record.
Results go to resumable tables in the run directory, one row per finished unit:

``recall_tokens.csv``  (precision, alignment, prompt_id, n): hits = Σ_l c(q,n,l), slots = k·L,
                       whether token/KV alignment happened before iteration n, and whether the
                       shadow's input token equalled the full model's o_n.
``recall_layers.csv``  (precision, alignment, prompt_id, layer): hits and slots summed over n.
``recall_runs.csv``    (precision, alignment, prompt_id): Eq. 3 recall of that prompt, timings;
                       written last, so it marks the (precision, alignment, prompt) unit done.
``references.csv``     (prompt_id): the full model's decode time and output.
``shadows.csv``        (precision): shadow and full-model weight bytes per component.

A run interrupted between the token/layer rows and the run row of a unit redoes that unit and
leaves duplicate rows; ``load_tables`` keeps the last row of each key.

On CPU the prompts are spread over ``workers`` forked processes with one torch thread each (small
models gain nothing from intra-op threads, and lose a lot to thread contention on a shared
machine); the parent alone writes the tables. On a GPU everything runs in the parent.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from odmoe.metrics import hits
from odmoe.models.load import LoadedModel
from odmoe.predict.sep import Alignment, ReferenceRecord, emulate, record_reference
from odmoe.predict.shadow import Shadow, build_shadow, weight_bytes
from odmoe.trace import save_trace

TOKENS, LAYERS, RUNS, REFERENCES, SHADOWS = (
    "recall_tokens",
    "recall_layers",
    "recall_runs",
    "references",
    "shadows",
)
KEYS = {
    TOKENS: ["precision", "alignment", "prompt_id", "n"],
    LAYERS: ["precision", "alignment", "prompt_id", "layer"],
    RUNS: ["precision", "alignment", "prompt_id"],
    REFERENCES: ["prompt_id"],
    SHADOWS: ["precision"],
}


@dataclass(frozen=True)
class Config:
    """One shadow configuration: a precision and a named alignment mode."""

    precision: str
    mode: str
    alignment: Alignment


def default_workers(device: torch.device, num_prompts: int) -> int:
    if device.type != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, num_prompts))


def _rows_for(
    cfg: Config, prompt_id: str, record: ReferenceRecord, shadow: Shadow, k: int
) -> dict[str, list]:
    t0 = time.perf_counter()
    em = emulate(shadow, record, cfg.alignment)
    seconds = time.perf_counter() - t0
    trace = record.trace
    c = hits(em.experts, trace.decode_experts)  # [O, Lm]
    out_len, lm = c.shape
    base = {"precision": cfg.precision, "alignment": cfg.mode, "prompt_id": prompt_id}
    same_input = em.inputs == trace.tokens
    tokens = [
        {
            **base,
            "n": n + 1,
            "hits": int(c[n].sum()),
            "slots": k * lm,
            "token_aligned": bool(em.token_aligned[n]),
            "kv_aligned": bool(em.kv_aligned[n]),
            "same_input": bool(same_input[n]),
        }
        for n in range(out_len)
    ]
    layers = [
        {**base, "layer": int(layer), "hits": int(c[:, i].sum()), "slots": k * out_len}
        for i, layer in enumerate(trace.moe_layers)
    ]
    diverged = np.flatnonzero(~same_input)
    run = {
        **base,
        "token_period": cfg.alignment.token_period or "off",
        "kv_period": cfg.alignment.kv_period or "off",
        "kv_positions": cfg.alignment.kv_positions,
        "output_len": out_len,
        "hits": int(c.sum()),
        "slots": k * lm * out_len,
        "recall": float(c.sum() / (k * lm * out_len)),
        "inputs_differing": int(len(diverged)),
        "first_differing_n": int(diverged[0] + 1) if len(diverged) else 0,
        "seconds": round(seconds, 4),
        "ms_per_token": round(1000 * seconds / out_len, 3),
    }
    return {TOKENS: tokens, LAYERS: layers, RUNS: [run]}


# State inherited by forked workers (set in the parent just before the pool starts).
_WORK: dict = {}


def _init_worker() -> None:
    torch.set_num_threads(1)


def _evaluate_prompt(task: tuple[str, tuple[int, ...], list[Config]]) -> dict[str, list]:
    prompt_id, token_ids, configs = task
    lm: LoadedModel = _WORK["lm"]
    shadows: dict[str, Shadow] = _WORK["shadows"]
    t0 = time.perf_counter()
    record = record_reference(lm.model, lm.adapter, prompt_id, token_ids, _WORK["output_len"])
    ref_seconds = time.perf_counter() - t0
    if _WORK.get("trace_dir"):
        save_trace(record.trace, _WORK["trace_dir"])
    out: dict[str, list] = {TOKENS: [], LAYERS: [], RUNS: []}
    for cfg in configs:
        for name, rows in _rows_for(cfg, prompt_id, record, shadows[cfg.precision], lm.adapter.top_k).items():
            out[name].extend(rows)
    out[REFERENCES] = [
        {
            "prompt_id": prompt_id,
            "prompt_len": len(token_ids),
            "output_len": record.output_len,
            "seconds": round(ref_seconds, 4),
            "ms_per_token": round(1000 * ref_seconds / record.output_len, 3),
            "output": lm.tokenizer.decode(record.trace.tokens.tolist()),
        }
    ]
    return out


def shadow_bytes_rows(
    lm: LoadedModel, shadows: dict[str, Shadow], build_seconds: dict[str, float]
) -> list[dict]:
    """One row per precision: shadow and full-model bytes by component, and their ratios."""
    full = weight_bytes(lm.model)
    rows = []
    for precision, shadow in shadows.items():
        mine = shadow.weight_bytes()
        row = {"precision": precision, "build_seconds": round(build_seconds[precision], 3)}
        for part in full:
            row[f"shadow_{part}"] = mine[part]
            row[f"full_{part}"] = full[part]
            row[f"ratio_{part}"] = round(mine[part] / full[part], 6) if full[part] else None
        rows.append(row)
    return rows


def evaluate(
    run,
    lm: LoadedModel,
    prompts: Sequence,
    output_len: int,
    precisions: Iterable[str],
    modes: Iterable[str],
    *,
    kv_positions: str = "since_last",
    prompt_kv: bool = False,
    int8_threshold: float = 6.0,
    workers: int | str | None = "auto",
    save_traces: bool = True,
) -> dict[str, float]:
    """Fill the run's tables for every (precision, mode, prompt) not done yet; returns timings."""
    from tqdm import tqdm

    precisions, modes = list(precisions), list(modes)
    configs = [Config(p, m, Alignment.parse(m, kv_positions, prompt_kv)) for p in precisions for m in modes]
    tables = {name: run.table(name, key) for name, key in KEYS.items()}
    t0 = time.perf_counter()
    shadows, build_seconds = {}, {}
    for p in precisions:
        t = time.perf_counter()
        shadows[p] = build_shadow(lm.model, lm.adapter, p, int8_threshold)
        build_seconds[p] = time.perf_counter() - t
    for row in shadow_bytes_rows(lm, shadows, build_seconds):
        if not tables[SHADOWS].done(precision=row["precision"]):
            tables[SHADOWS].add(row)
    build_s = time.perf_counter() - t0

    tasks = []
    for p in prompts:
        todo = [
            c
            for c in configs
            if not tables[RUNS].done(precision=c.precision, alignment=c.mode, prompt_id=p.id)
        ]
        if todo:
            tasks.append((p.id, tuple(p.token_ids), todo))
    device = next(lm.model.parameters()).device
    n_workers = default_workers(device, len(tasks)) if workers in (None, "auto") else int(workers)
    n_workers = max(1, min(n_workers, len(tasks))) if device.type == "cpu" else 1
    _WORK.update(
        lm=lm, shadows=shadows, output_len=output_len, trace_dir=run.path("traces") if save_traces else None
    )

    def write(result: dict[str, list]) -> None:
        for name in (TOKENS, LAYERS, REFERENCES, RUNS):  # the run rows last: they mark a unit done
            for row in result.get(name, []):
                if name == REFERENCES and tables[name].done(prompt_id=row["prompt_id"]):
                    continue
                tables[name].add(row)

    t1 = time.perf_counter()
    try:
        bar = tqdm(total=len(tasks), desc=f"SEP recall ({n_workers} worker(s))", leave=False)
        if n_workers == 1:
            for task in tasks:
                write(_evaluate_prompt(task))
                bar.update()
        else:
            with mp.get_context("fork").Pool(n_workers, initializer=_init_worker) as pool:
                for result in pool.imap_unordered(_evaluate_prompt, tasks):
                    write(result)
                    bar.update()
        bar.close()
    finally:
        _WORK.clear()
    return {
        "shadow_build_s": round(build_s, 3),
        "decode_s": round(time.perf_counter() - t1, 3),
        "workers": n_workers,
    }


def load_tables(run) -> dict[str, pd.DataFrame]:
    """The run's tables, each with one row per key (the last written wins)."""
    out = {}
    for name, key in KEYS.items():
        path = run.path(f"{name}.csv") if hasattr(run, "path") else os.path.join(run, f"{name}.csv")
        frame = pd.read_csv(path) if os.path.exists(path) else pd.DataFrame(columns=key)
        out[name] = frame.drop_duplicates(subset=key, keep="last").reset_index(drop=True)
    return out


# The paper's numbers (PAPER.md §9.1, §9.2). Aligned = token + KV every iteration (T1_KV1). The
# unaligned INT8 value is read from Fig. 3 (mean over 256 tokens), not stated in the text.
PAPER_RECALL = {
    ("fp16", "token_kv"): (0.9994, "Table 1"),
    ("int8", "token_kv"): (0.9734, "Table 1"),
    ("nf4", "token_kv"): (0.9567, "Table 1"),
    ("int8", "none"): (0.45, "Fig. 3, approx. mean over 256 tokens (~1.0 at n=1, ~0.30 at n=256)"),
}


def quarter_masks(n: pd.Series, output_len: int) -> tuple[pd.Series, pd.Series]:
    """Rows of the first quarter (n <= N/4) and of the last quarter (n > 3N/4) of N output tokens."""
    return n <= output_len / 4, n > 3 * output_len / 4


def recall_by_config(tokens: pd.DataFrame, output_len: int) -> pd.DataFrame:
    """Eq. 3 recall per (precision, alignment), overall and over the first and last quarter of tokens."""
    rows = []
    for (precision, mode), g in tokens.groupby(["precision", "alignment"], sort=False):
        first, last = quarter_masks(g["n"], output_len)
        paper, source = PAPER_RECALL.get((precision, mode), (None, ""))
        rows.append(
            {
                "precision": precision,
                "alignment": mode,
                "prompts": g["prompt_id"].nunique(),
                "tokens": len(g),
                "recall": g["hits"].sum() / g["slots"].sum(),
                "recall_first_quarter": g.loc[first, "hits"].sum() / g.loc[first, "slots"].sum(),
                "recall_last_quarter": g.loc[last, "hits"].sum() / g.loc[last, "slots"].sum(),
                "same_input_share": g["same_input"].mean(),
                "paper_recall": paper,
                "paper_source": source,
            }
        )
    return pd.DataFrame(rows)
