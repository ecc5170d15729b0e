"""The host's own noise on thread CPU time: the floor under any ``measured`` (``odmoe/clock.py``) number.

    python -m benchmarks.cpu_time_noise [--model tiny-mixtral] [--steps 64] [--repeats 6]

One process pinned to CPU 0 decodes ``--steps`` tokens of the embedded model at batch 1 (one torch thread),
``--repeats`` times, and records each repeat's ``time.thread_time`` and wall time, under three conditions
in turn: alone; beside a busy process pinned to the other CPU; beside one pinned to the same CPU (so the
two are time-sliced). The work is identical every time, so the spread of CPU time *alone* is what the
host adds by itself (other guests of a cloud host, frequency, caches), and the other two rows show what a
neighbour adds. A ``measured`` comparison cannot be finer than that floor.

Before every step the speed probe of the calibrated clock (``odmoe.clock.probe_seconds``, a decoder block)
runs, and ``calibrated_s`` charges each step as the clock does: its CPU time times the profile's
``probe_seconds`` over the probe. Three other candidate probes run beside it (``product_s``: the clock's
first probe, one 1 x 96 by 96 x 192 product; ``python_s``: a pure-Python loop; ``memory_s``: reductions over
2 MB), each step charged at its probe's speed relative to that probe's median in the warm-up: the one whose
correction leaves the least spread tracks the decode best. Linux only. Writes ``runs.csv`` and
``summary.json`` under ``results/benchmarks/cpu_time_noise/<name>/``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import DynamicCache

from odmoe.clock import probe_seconds
from odmoe.hardware import load_profile
from odmoe.models.load import load_model
from odmoe.results import machine

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = {"alone": None, "hog on the other CPU": 1, "hog on the same CPU": 0}


def _spin(cpu: int, stop: float) -> None:
    os.sched_setaffinity(0, {cpu})
    while time.time() < stop:
        pass


_PRODUCT_X = torch.linspace(-1.0, 1.0, 96)[None]
_PRODUCT_W = torch.linspace(-1.0, 1.0, 192 * 96).reshape(192, 96)
_MEMORY = torch.linspace(-1.0, 1.0, 512 * 1024)  # 2 MB


def _timed(fn, untimed: int, timed: int) -> float:
    for _ in range(untimed):
        fn()
    t0 = time.thread_time()
    for _ in range(timed):
        fn()
    return time.thread_time() - t0


def _python_loop() -> int:
    return sum(i * i % 7 for i in range(1000))


CANDIDATES = {  # name -> a candidate probe's thread CPU seconds
    "product": lambda: _timed(lambda: torch.nn.functional.silu(_PRODUCT_X @ _PRODUCT_W.T).sum(), 10, 40),
    "python": lambda: _timed(_python_loop, 0, 6),
    "memory": lambda: _timed(_MEMORY.sum, 0, 8),
}
PROBES = {"calibrated": probe_seconds, **CANDIDATES}  # the clock's own probe first (column calibrated_s)


@torch.inference_mode()
def _decode(model, steps: int, reference: dict[str, float]) -> dict[str, float]:
    """CPU, wall and probe-corrected seconds of ``steps`` decode steps (the probes between them not counted)."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.arange(5, 13)[None], cache=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    totals = dict.fromkeys(["cpu_s", "wall_s", *(f"{n}_s" for n in PROBES)], 0.0)
    readings = {n: [] for n in PROBES}
    for _ in range(steps):
        for n, probe in PROBES.items():
            readings[n].append(probe())
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        step = time.thread_time() - cpu0
        totals["wall_s"] += time.perf_counter() - wall0
        totals["cpu_s"] += step
        for n in PROBES:
            totals[f"{n}_s"] += step * reference[n] / readings[n][-1]
    return totals | {f"probe_{n}_s": float(np.median(v)) for n, v in readings.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-mixtral")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument(
        "--profile", default="cpu-emulated", help="hardware profile whose probe_seconds calibrates"
    )
    ap.add_argument("--name", default="default")
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("cpu_time_noise needs two CPUs (one for the decode, one for the neighbour)")
    out = ROOT / "results" / "benchmarks" / "cpu_time_noise" / args.name
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {0})
    reference_probe = load_profile(args.profile).probe_seconds
    if not reference_probe:
        raise SystemExit(
            f"hardware profile {args.profile} has no probe_seconds; pick one that has (cpu-emulated)"
        )
    model = load_model(args.model).model
    ones = {"calibrated": reference_probe, **dict.fromkeys(CANDIDATES, 1.0)}
    warm = _decode(model, args.steps, ones)  # warm-up; it also fixes the candidates' reference speeds
    reference = {"calibrated": reference_probe, **{n: warm[f"probe_{n}_s"] for n in CANDIDATES}}
    rows = []
    for condition, cpu in CONDITIONS.items():
        hog = None
        if cpu is not None:
            hog = mp.get_context("fork").Process(target=_spin, args=(cpu, time.time() + 3600), daemon=True)
            hog.start()
            time.sleep(0.5)
        try:
            for rep in range(args.repeats):
                rows.append({"condition": condition, "repeat": rep, **_decode(model, args.steps, reference)})
        finally:
            if hog is not None:
                hog.terminate()
                hog.join()
    runs = pd.DataFrame(rows)
    runs.to_csv(out / "runs.csv", index=False)
    frames = []
    for clock in ("cpu_s", *(f"{n}_s" for n in PROBES)):
        stats = runs.groupby("condition", sort=False)[clock].agg(["min", "median", "max"])
        stats["spread"] = (stats["max"] - stats["min"]) / stats["median"]
        stats["median_vs_alone"] = stats["median"] / stats.loc["alone", "median"] - 1
        stats["cv_all_conditions"] = runs[clock].std() / runs[clock].mean()
        frames.append(stats.assign(clock=clock).set_index("clock", append=True))
    stats = pd.concat(frames)
    summary = {
        "args": vars(args),
        "reference_probe_s": reference,
        "machine": machine(),
        "by_condition": {f"{c}/{k}": v for (c, k), v in stats.to_dict(orient="index").items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(stats.to_string(float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
