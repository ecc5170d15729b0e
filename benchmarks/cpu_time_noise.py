"""The host's own noise on thread CPU time: the floor under any ``measured`` (``odmoe/clock.py``) number.

    python -m benchmarks.cpu_time_noise [--model tiny-mixtral] [--steps 64] [--repeats 6]

One process pinned to CPU 0 decodes ``--steps`` tokens of the embedded model at batch 1 (one torch thread),
``--repeats`` times, and records each repeat's ``time.thread_time`` and wall time, under three conditions
in turn: alone; beside a busy process pinned to the other CPU; beside one pinned to the same CPU (so the
two are time-sliced). The work is identical every time, so the spread of CPU time *alone* is what the
host adds by itself (other guests of a cloud host, frequency, caches), and the other two rows show what a
neighbour adds. A ``measured`` comparison cannot be finer than that floor. Linux only (CPU affinity).
Writes ``runs.csv`` and ``summary.json`` under ``results/benchmarks/cpu_time_noise/<name>/``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import DynamicCache

from odmoe.models.load import load_model
from odmoe.results import machine

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = {"alone": None, "hog on the other CPU": 1, "hog on the same CPU": 0}


def _spin(cpu: int, stop: float) -> None:
    os.sched_setaffinity(0, {cpu})
    while time.time() < stop:
        pass


@torch.inference_mode()
def _decode(model, steps: int) -> tuple[float, float]:
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.arange(5, 13)[None], cache=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for _ in range(steps):
        token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return time.thread_time() - cpu0, time.perf_counter() - wall0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-mixtral")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--name", default="default")
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("cpu_time_noise needs two CPUs (one for the decode, one for the neighbour)")
    out = ROOT / "results" / "benchmarks" / "cpu_time_noise" / args.name
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {0})
    model = load_model(args.model).model
    _decode(model, args.steps)  # warm-up
    rows = []
    for condition, cpu in CONDITIONS.items():
        hog = None
        if cpu is not None:
            hog = mp.get_context("fork").Process(target=_spin, args=(cpu, time.time() + 3600), daemon=True)
            hog.start()
            time.sleep(0.5)
        try:
            for rep in range(args.repeats):
                cpu_s, wall_s = _decode(model, args.steps)
                rows.append({"condition": condition, "repeat": rep, "cpu_s": cpu_s, "wall_s": wall_s})
        finally:
            if hog is not None:
                hog.terminate()
                hog.join()
    runs = pd.DataFrame(rows)
    runs.to_csv(out / "runs.csv", index=False)
    stats = runs.groupby("condition", sort=False)["cpu_s"].agg(["min", "median", "max"])
    stats["spread"] = (stats["max"] - stats["min"]) / stats["median"]
    stats["median_vs_alone"] = stats["median"] / stats.loc["alone", "median"] - 1
    summary = {"args": vars(args), "machine": machine(), "by_condition": stats.to_dict(orient="index")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(stats.to_string(float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
