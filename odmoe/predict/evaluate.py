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

Replay (``replay=auto``, the default): the references are decoded in batches (each worker one
share of the prompts), then every configuration is one unit over all prompts, replayed by the
fastest exact path (``odmoe.predict.sep.replay``): token alignment every iteration as one parallel
pass per prompt, every other mode as one row-exact batched decode per prompt length (bit for bit the
sequential one). ``replay=sequential`` is
the reference: one prompt at a time, ``record_reference`` and ``emulate``.

On CPU the prompts are spread over ``workers`` forked processes with one torch thread each (small
models gain nothing from intra-op threads, and lose a lot to thread contention on a shared
machine); the parent alone writes the tables. On a GPU everything runs in the parent.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from odmoe import signals
from odmoe.errors import OdmoeError
from odmoe.metrics import hits
from odmoe.models.load import LoadedModel
from odmoe.predict.sep import (
    REPLAYS,
    Alignment,
    Emulation,
    ReferenceRecord,
    record_reference,
    record_references,
)
from odmoe.predict.sep import (
    replay as sep_replay,
)
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


def unit_rows(
    cfg: Config, record: ReferenceRecord, em: Emulation, k: int, seconds: float, path: str, batch: int
) -> dict[str, list]:
    """Table rows of one (configuration, prompt) unit; ``seconds`` is its share of the replay."""
    trace = record.trace
    prompt_id = trace.prompt_id
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
        "replay": path,
        "batch": batch,
        "seconds": round(seconds, 4),
        "ms_per_token": round(1000 * seconds / out_len, 3),
    }
    return {TOKENS: tokens, LAYERS: layers, RUNS: [run]}


# State inherited by forked workers (set in the parent just before the pool starts).
_WORK: dict = {}


def _init_worker() -> None:
    torch.set_num_threads(1)


def _reference_rows(records: Sequence[ReferenceRecord], seconds: float, batch: int) -> list[dict]:
    tokenizer = _WORK["lm"].tokenizer
    return [
        {
            "prompt_id": r.trace.prompt_id,
            "prompt_len": len(r.trace.prompt),
            "output_len": r.output_len,
            "batch": batch,
            "seconds": round(seconds, 4),
            "ms_per_token": round(1000 * seconds / r.output_len, 3),
            "output": tokenizer.decode(r.trace.tokens.tolist()),
        }
        for r in records
    ]


def _save_traces(records: Sequence[ReferenceRecord]) -> None:
    if _WORK.get("trace_dir"):
        for record in records:
            save_trace(record.trace, _WORK["trace_dir"])


def _sequential_prompt(task: tuple[str, tuple[int, ...], list[Config]]) -> dict[str, list]:
    """``replay=sequential``: one prompt's ``record_reference`` and ``emulate`` of each configuration."""
    prompt_id, token_ids, configs = task
    lm: LoadedModel = _WORK["lm"]
    t0 = time.perf_counter()
    record = record_reference(lm.model, lm.adapter, prompt_id, token_ids, _WORK["output_len"])
    ref_seconds = time.perf_counter() - t0
    _save_traces([record])
    out: dict[str, list] = {TOKENS: [], LAYERS: [], RUNS: []}
    for cfg in configs:
        t0 = time.perf_counter()
        (em,), path = sep_replay(_WORK["shadows"][cfg.precision], [record], cfg.alignment, "sequential")
        rows = unit_rows(cfg, record, em, lm.adapter.top_k, time.perf_counter() - t0, path, 1)
        for name, part in rows.items():
            out[name].extend(part)
    out[REFERENCES] = _reference_rows([record], ref_seconds, 1)
    return out


def _record_group(pairs: list[tuple[str, tuple[int, ...]]]) -> tuple[list[ReferenceRecord], float]:
    """``replay=auto``: the references of a group of prompts, one batched decode; and its seconds."""
    lm: LoadedModel = _WORK["lm"]
    t0 = time.perf_counter()
    records = record_references(lm.model, lm.adapter, pairs, _WORK["output_len"])
    return records, time.perf_counter() - t0


def _replay_unit(unit: tuple[Config, list[int]]) -> dict[str, list]:
    """``replay=auto``: one configuration over the chunk's records it still needs (one ``replay``)."""
    cfg, indices = unit
    records = [_WORK["records"][i] for i in indices]
    t0 = time.perf_counter()
    ems, path = sep_replay(_WORK["shadows"][cfg.precision], records, cfg.alignment, "auto")
    seconds = (time.perf_counter() - t0) / len(records)
    out: dict[str, list] = {TOKENS: [], LAYERS: [], RUNS: []}
    for record, em in zip(records, ems, strict=True):
        for name, part in unit_rows(
            cfg, record, em, _WORK["lm"].adapter.top_k, seconds, path, len(records)
        ).items():
            out[name].extend(part)
    return out


@contextmanager
def _pool_map(fn, items: list, workers: int, ordered: bool = True) -> Iterator[Iterator]:
    """``fn`` over ``items``: in this process, or in ``workers`` forked processes (one thread each).
    A block, not a generator, so that leaving it (also by a signal raised in the caller's loop)
    terminates the pool at once, not whenever a suspended generator is collected."""
    if workers == 1 or len(items) == 1:
        yield map(fn, items)
        return
    with mp.get_context("fork").Pool(min(workers, len(items)), initializer=_init_worker) as pool:
        yield (pool.imap if ordered else pool.imap_unordered)(fn, items)


def _auto_chunk(chunk: list, workers: int, write, bar) -> None:
    """``replay=auto`` over a chunk of prompts: batched references (the prompts split over the
    workers), then one unit per configuration over all the chunk's prompts, spread over the workers
    (the sequential-by-nature ones first: they are the long ones)."""
    shares = [[(pid, ids) for pid, ids, _ in chunk[i::workers]] for i in range(workers)]
    records: dict[str, ReferenceRecord] = {}
    with _pool_map(_record_group, [s for s in shares if s], workers) as results:
        for records_part, seconds in results:
            _save_traces(records_part)
            write({REFERENCES: _reference_rows(records_part, seconds / len(records_part), len(records_part))})
            records |= {r.trace.prompt_id: r for r in records_part}
    _WORK["records"] = [records[pid] for pid, _, _ in chunk]
    units = []
    for cfg in _WORK["configs"]:
        indices = [i for i, (_, _, todo) in enumerate(chunk) if cfg in todo]
        if indices:
            units.append((cfg, indices))
    units.sort(key=lambda u: u[0].alignment.token_period == 1)  # batched (long) units first
    with _pool_map(_replay_unit, units, workers, ordered=False) as results:
        for result in results:
            write(result)
            bar.update(len(result[RUNS]))


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
    replay: str = "auto",
    batch_prompts: int = 32,
) -> dict[str, float]:
    """Fill the run's tables for every (precision, mode, prompt) not done yet; returns timings.

    ``replay``: ``auto`` takes the fastest exact path per configuration (``odmoe.predict.sep.replay``:
    one parallel pass per prompt for token period 1, one row-exact batch per prompt length otherwise) after
    batched reference decodes; ``sequential`` forces the reference: per prompt ``record_reference``
    and ``emulate``. ``batch_prompts`` caps the prompts handled together (their reference KV is held
    in memory). Seconds of a batched pass are split evenly over its prompts in the tables.
    """
    from tqdm import tqdm

    if replay not in REPLAYS:
        raise OdmoeError(
            f"unknown replay {replay!r}; use auto (fastest exact path) or sequential (reference)"
        )
    if int(batch_prompts) < 1:
        raise OdmoeError(f"batch_prompts must be >= 1, got {batch_prompts}")
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
        lm=lm,
        shadows=shadows,
        configs=configs,
        output_len=output_len,
        trace_dir=run.path("traces") if save_traces else None,
    )

    def write(result: dict[str, list]) -> None:
        with signals.deferred():  # a unit's rows all or none: a resumed run redoes a unit without run rows
            for name in (TOKENS, LAYERS, REFERENCES, RUNS):  # the run rows last: they mark a unit done
                for row in result.get(name, []):
                    if name == REFERENCES and tables[name].done(prompt_id=row["prompt_id"]):
                        continue
                    tables[name].add(row)

    t1 = time.perf_counter()
    units = sum(len(todo) for _, _, todo in tasks)
    try:
        bar = tqdm(total=units, desc=f"SEP recall ({replay} replay, {n_workers} worker(s))", leave=False)
        if replay == "sequential":
            with _pool_map(_sequential_prompt, tasks, n_workers, ordered=False) as results:
                for result in results:
                    write(result)
                    bar.update(len(result[RUNS]))
        else:
            for i in range(0, len(tasks), int(batch_prompts)):
                _auto_chunk(tasks[i : i + int(batch_prompts)], n_workers, write, bar)
        bar.close()
    finally:
        _WORK.clear()
    return {
        "shadow_build_s": round(build_s, 3),
        "decode_s": round(time.perf_counter() - t1, 3),
        "workers": n_workers,
        "replay": replay,
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
