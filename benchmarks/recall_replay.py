"""Fast vs sequential SEP replay on the ``+exp=recall`` workload, side by side in one run.

    python -m benchmarks.recall_replay [hydra overrides of +exp=recall, e.g. exp.num_prompts=2]

The workload is the one ``+exp=recall`` composes (default: tiny-mixtral, 6 prompts x 512 tokens,
fp16/int8/nf4 x none/token/token_kv), arranged as ``+exp=recall`` with ``replay=auto`` arranges it
over ``exp.workers`` forked processes with one torch thread each, and timed against the sequential
path on the same work:

* references: each worker takes one share of the prompts and decodes it both ways,
  ``record_reference`` per prompt and ``record_references`` (one batch);
* cells: one unit per (precision, alignment) over all prompts, spread over the workers; each unit
  runs back to back the fast ``replay`` (parallel or batched) and the sequential ``emulate`` per
  prompt. Finished cells are appended to ``cells.jsonl`` as they come.

Clocks: wall time (``time.perf_counter``) and the worker's CPU time (``time.process_time``); on a
shared host the CPU time is the steadier measure of work, the wall time what a user waits. Times
are summed over workers (the work of one core). Ratios are sequential / fast of the same clock.

Each side's recall table (Eq. 3 per cell, the printed four decimals) is computed against its own
references, exactly as ``+exp=recall`` would; the routing decisions (prompt, iteration, layer rows)
where the fast replay differs from ``emulate`` are counted. Writes ``cells.csv``, ``tables.csv`` and
``summary.json`` under ``results/benchmarks/recall_replay/<name>`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir

from odmoe.data.prompts import load_prompts
from odmoe.models import load_from_cfg
from odmoe.paths import repo_root
from odmoe.predict.evaluate import TOKENS, Config, default_workers, recall_by_config, unit_rows
from odmoe.predict.sep import Alignment, emulate, record_reference, record_references, replay
from odmoe.predict.shadow import build_shadow, check_precision

_WORK: dict = {}


class Clock:
    """Wall and CPU seconds of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _differing_rows(a: list, b: list) -> int:
    """(prompt, iteration, layer) routing decisions whose expert sets differ."""
    return sum(
        int((np.sort(x.experts, -1) != np.sort(y.experts, -1)).any(-1).sum())
        for x, y in zip(a, b, strict=True)
    )


def _references(prompts: list[tuple[str, tuple[int, ...]]]) -> tuple[dict, list, list]:
    """One worker's share of the prompts: sequential and batched reference decodes, timed."""
    lm, out_len = _WORK["lm"], _WORK["output_len"]
    with Clock() as seq:
        seq_records = [record_reference(lm.model, lm.adapter, pid, ids, out_len) for pid, ids in prompts]
    with Clock() as fast:
        fast_records = record_references(lm.model, lm.adapter, prompts, out_len)
    pairs = list(zip(seq_records, fast_records, strict=True))
    refs = {
        "prompts": len(prompts),
        "seq_wall": seq.wall,
        "seq_cpu": seq.cpu,
        "fast_wall": fast.wall,
        "fast_cpu": fast.cpu,
        "tokens_differing": sum(int((a.trace.tokens != b.trace.tokens).sum()) for a, b in pairs),
        "routing_rows_differing": sum(
            int((np.sort(a.trace.decode_experts, -1) != np.sort(b.trace.decode_experts, -1)).any(-1).sum())
            for a, b in pairs
        ),
    }
    return refs, seq_records, fast_records


def _cell(cfg: Config) -> dict:
    """One (precision, alignment) cell over every prompt: fast, sequential, fast again."""
    shadow, k = _WORK["shadows"][cfg.precision], _WORK["lm"].adapter.top_k
    seq_records, fast_records = _WORK["seq_records"], _WORK["fast_records"]
    with Clock() as fast_clock:
        fast, path = replay(shadow, fast_records, cfg.alignment)
    with Clock() as seq:
        ref = [emulate(shadow, r, cfg.alignment) for r in seq_records]
    rows = {"fast": [], "sequential": []}
    for side, records, ems in (("fast", fast_records, fast), ("sequential", seq_records, ref)):
        for record, em in zip(records, ems, strict=True):
            rows[side].extend(unit_rows(cfg, record, em, k, 0.0, path, len(records))[TOKENS])
    cell = {
        "precision": cfg.precision,
        "alignment": cfg.mode,
        "path": path,
        "prompts": len(seq_records),
        "seq_wall": seq.wall,
        "seq_cpu": seq.cpu,
        "fast_wall": fast_clock.wall,
        "fast_cpu": fast_clock.cpu,
        "routing_rows": sum(e.experts.shape[0] * e.experts.shape[1] for e in ref),
        "routing_rows_differing": _differing_rows(ref, fast),
    }
    return {"cell": cell, "rows": rows}


def _map(fn, items: list, workers: int, ordered: bool = True):
    if workers == 1:
        yield from map(fn, items)
        return
    with mp.get_context("fork").Pool(
        min(workers, len(items)), initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        yield from (pool.imap if ordered else pool.imap_unordered)(fn, items)


def _ratio(frame: pd.DataFrame, clock: str) -> float:
    return float(frame[f"seq_{clock}"].sum() / frame[f"fast_{clock}"].sum())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of +exp=recall (e.g. exp.num_prompts=2)"
    )
    parser.add_argument("--name", default="default", help="results/benchmarks/recall_replay/<name>")
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=str(repo_root() / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["+exp=recall", *args.overrides])
    e = cfg.exp
    torch.manual_seed(int(cfg.seed))
    lm = load_from_cfg(cfg)
    prompts = load_prompts(cfg.data, lm.tokenizer, int(e.prompt_len), int(e.num_prompts))
    precisions = [check_precision(str(p)) for p in e.precisions]
    configs = [
        Config(p, str(m), Alignment.parse(str(m), str(e.kv_positions), bool(e.prompt_kv)))
        for p in precisions
        for m in e.alignments
    ]
    shadows = {p: build_shadow(lm.model, lm.adapter, p, float(e.int8_threshold)) for p in precisions}
    device = next(lm.model.parameters()).device
    workers = default_workers(device, len(prompts)) if e.workers in (None, "auto") else int(e.workers)
    workers = max(1, min(workers, len(prompts)))
    shares = [[(p.id, tuple(p.token_ids)) for p in prompts[i::workers]] for i in range(workers)]
    _WORK.update(lm=lm, shadows=shadows, configs=configs, output_len=int(e.output_len))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    parts = list(_map(_references, shares, workers))  # as +exp=recall: each worker one share of the prompts
    print(f"references done after {time.perf_counter() - t0:.0f} s", flush=True)
    order = {p.id: i for i, p in enumerate(prompts)}
    for side, j in (("seq_records", 1), ("fast_records", 2)):
        _WORK[side] = sorted((r for part in parts for r in part[j]), key=lambda r: order[r.trace.prompt_id])
    # as +exp=recall: one unit per configuration over all prompts; token_kv cells first, and each
    # finished cell is appended to cells.jsonl (a run cut short still has its finished cells)
    out = repo_root() / "results" / "benchmarks" / "recall_replay" / args.name
    out.mkdir(parents=True, exist_ok=True)
    rank = {"token_kv": 0, "token": 1}
    ordered = sorted(configs, key=lambda c: rank.get(c.mode, 2))
    results = []
    with open(out / "cells.jsonl", "w") as log:
        for r in _map(_cell, ordered, workers, ordered=False):
            results.append(r)
            log.write(
                json.dumps({**r["cell"], "loadavg": os.getloadavg()[0], "at_s": time.perf_counter() - t0})
                + "\n"
            )
            log.flush()
            c = r["cell"]
            print(
                f"{c['precision']} {c['alignment']} ({c['path']}): sequential {c['seq_wall']:.1f} s wall "
                f"{c['seq_cpu']:.1f} s CPU, fast {c['fast_wall']:.2f} / {c['fast_cpu']:.2f}; "
                f"{c['routing_rows_differing']} of {c['routing_rows']} rows differ",
                flush=True,
            )
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()

    cells = pd.DataFrame([r["cell"] for r in results])
    cells = (
        cells.set_index(["precision", "alignment"])
        .loc[[(c.precision, c.mode) for c in configs]]
        .reset_index()
    )
    refs = pd.DataFrame([part[0] for part in parts]).sum(numeric_only=True)
    tables = {}
    for side in ("fast", "sequential"):
        tokens = pd.DataFrame([row for r in results for row in r["rows"][side]])
        table = recall_by_config(tokens, int(e.output_len)).set_index(["precision", "alignment"])
        tables[side] = table.loc[[(c.precision, c.mode) for c in configs]]
    printed = lambda v: f"{v:.4f}"  # noqa: E731  (the precision +exp=recall prints)
    cols = ["recall", "recall_first_quarter", "recall_last_quarter"]
    table = pd.concat({side: t[cols] for side, t in tables.items()}, axis=1)
    fast_t, seq_t = tables["fast"], tables["sequential"]
    equal = all(printed(fast_t.loc[i, c]) == printed(seq_t.loc[i, c]) for i in table.index for c in cols)
    cells["ratio_wall"] = cells["seq_wall"] / cells["fast_wall"]
    cells["ratio_cpu"] = cells["seq_cpu"] / cells["fast_cpu"]
    total = pd.concat(
        [
            cells[["seq_wall", "seq_cpu", "fast_wall", "fast_cpu"]],
            refs.to_frame().T[["seq_wall", "seq_cpu", "fast_wall", "fast_cpu"]],
        ]
    )
    kv = cells[cells["alignment"] == "token_kv"]
    summary = {
        "model": lm.name,
        "prompts": len(prompts),
        "output_len": int(e.output_len),
        "workers": workers,
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "benchmark_wall_s": round(wall, 1),
        "cpu_share_of_wall": round(
            float(total["seq_cpu"].sum() + total["fast_cpu"].sum()) / (wall * workers), 3
        ),
        "overall_ratio_wall": round(_ratio(total, "wall"), 2),
        "overall_ratio_cpu": round(_ratio(total, "cpu"), 2),
        "token_kv_ratio_wall": round(_ratio(kv, "wall"), 2) if len(kv) else None,
        "token_kv_ratio_cpu": round(_ratio(kv, "cpu"), 2) if len(kv) else None,
        "reference_ratio_wall": round(float(refs["seq_wall"] / refs["fast_wall"]), 2),
        "reference_tokens_differing": int(refs["tokens_differing"]),
        "reference_routing_rows_differing": int(refs["routing_rows_differing"]),
        "replay_routing_rows": int(cells["routing_rows"].sum()),
        "replay_routing_rows_differing": int(cells["routing_rows_differing"].sum()),
        "recall_tables_equal_to_4_decimals": bool(equal),
        "sequential_s_wall": round(float(total["seq_wall"].sum()), 1),
        "fast_s_wall": round(float(total["fast_wall"].sum()), 1),
    }
    cells.to_csv(out / "cells.csv", index=False)
    table.to_csv(out / "tables.csv")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(_markdown(cells, refs))
    print(table.to_string(float_format=printed))
    print(json.dumps(summary, indent=2))
    return summary


def _markdown(cells: pd.DataFrame, refs: pd.Series) -> str:
    lines = [
        "| cell | fast path | sequential s (wall / CPU) | fast s (wall / CPU) | ratio wall / CPU | routing rows differing |",
        "|---|---|---|---|---|---|",
        f"| references | batched | {refs.seq_wall:.1f} / {refs.seq_cpu:.1f} | {refs.fast_wall:.1f} / {refs.fast_cpu:.1f} "
        f"| {refs.seq_wall / refs.fast_wall:.1f}x / {refs.seq_cpu / refs.fast_cpu:.1f}x | {int(refs.routing_rows_differing)} |",
    ]
    for c in cells.itertuples():
        lines.append(
            f"| {c.precision} {c.alignment} | {c.path} | {c.seq_wall:.1f} / {c.seq_cpu:.1f} | {c.fast_wall:.2f} / {c.fast_cpu:.2f} "
            f"| {c.ratio_wall:.1f}x / {c.ratio_cpu:.1f}x | {int(c.routing_rows_differing)} of {int(c.routing_rows)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
