"""Host invariance of the virtual clock: the same Table 2 run on a quiet host and beside CPU hogs.

    python benchmarks/host_invariance.py [--hogs 2] [--clocks modelled measured] [--repeats 1]
                                         [--uncalibrated] [--out results/benchmarks/host_invariance]

For each clock it runs ``+exp=e2e 'exp.systems=[cached,odmoe,mixtral_offloading]'`` on
``hardware=cpu-emulated`` alone, then with ``--hogs`` busy processes (pure-Python spin loops, one per core)
running for exactly as long as the run; ``--repeats`` alternates the two conditions that many times, so
that a drift of the host is not read as an effect of the hogs. It writes ``runs.csv`` (decode and output
tok/s and TTFT per system, clock, condition and repeat, and ``steal``: the share of the guest's CPU time
its hypervisor gave to other guests during the run, from /proc/stat) and ``summary.json``: per system and
clock, the relative difference between the medians of the loaded and the quiet runs, and the spread of
each condition's runs ((max - min) / median), which is the host's own noise on that clock. It prints the
table. ``benchmarks/cpu_time_noise.py`` measures that noise floor directly. ``measured`` is the default
calibrated clock (odmoe/clock.py: thread CPU time at the reference host's speed, from a probe every 5 ms of
compute); ``--uncalibrated`` runs it with ``timing.calibrate=false`` (raw thread CPU time).

Expected (odmoe/clock.py): ``modelled`` identical to the last digit; ``measured`` within a few percent (thread
CPU time does not count time a thread is descheduled, but shared caches and memory bandwidth still slow it).
The quiet run is only as quiet as the host: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = "[cached,odmoe,mixtral_offloading]"


def _spin(stop: float) -> None:
    x = 0
    while time.time() < stop:
        x += 1


def _cpu_jiffies() -> tuple[int, int]:
    """(steal, total) of the host's CPUs so far (/proc/stat; (0, 0) where there is none)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def run_e2e(timing: str, name: str, results: Path, hogs: int, calibrate: bool = True) -> pd.DataFrame:
    cmd = [
        sys.executable, "-m", "experiments.run", "+exp=e2e", f"timing={timing}", "hardware=cpu-emulated",
        f"exp.systems={SYSTEMS}", "exp.workloads=[[16,64]]", "exp.num_prompts=2",
        f"results_dir={results}", f"run={name}",
    ] + ([] if calibrate or timing != "measured" else ["timing.calibrate=false"])  # fmt: skip
    procs = []
    steal0, total0 = _cpu_jiffies()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    if hogs:
        procs = [mp.Process(target=_spin, args=(time.time() + 3600,), daemon=True) for _ in range(hogs)]
        for p in procs:
            p.start()
    try:
        if proc.wait() != 0:
            raise SystemExit(f"the {timing} run {name} failed (exit {proc.returncode})")
    finally:
        for p in procs:
            p.terminate()
    steal1, total1 = _cpu_jiffies()
    t2 = pd.read_csv(results / "e2e" / name / "table2.csv")
    steal = (steal1 - steal0) / (total1 - total0) if total1 > total0 else float("nan")
    return t2.assign(timing=timing, condition="loaded" if hogs else "quiet", steal=round(steal, 4))


def _spread(values: pd.Series) -> float:
    return float((values.max() - values.min()) / values.median())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hogs", type=int, default=2)
    ap.add_argument("--clocks", nargs="+", default=["modelled", "measured"], choices=["modelled", "measured"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--uncalibrated", action="store_true", help="measured with timing.calibrate=false")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "host_invariance")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    frames = [
        run_e2e(
            timing,
            f"{stamp}-{timing}-{'loaded' if hogs else 'quiet'}-{rep}",
            args.out,
            hogs,
            not args.uncalibrated,
        ).assign(repeat=rep)
        for timing in args.clocks
        for rep in range(args.repeats)
        for hogs in (0, args.hogs)
    ]
    runs = pd.concat(frames, ignore_index=True)
    cols = [
        "timing",
        "condition",
        "repeat",
        "steal",
        "system",
        "executor",
        "ttft_ms",
        "decode_tps",
        "output_tps",
    ]
    runs[cols].to_csv(args.out / "runs.csv", index=False)
    by = runs.groupby(["timing", "system", "executor", "condition"])["decode_tps"]
    wide = by.median().unstack("condition")
    wide["rel_diff"] = (wide["loaded"] - wide["quiet"]).abs() / wide["quiet"]
    for condition in ("quiet", "loaded"):
        wide[f"spread_{condition}"] = by.apply(_spread).unstack("condition")[condition]
    summary = {f"{t}/{s}/{e}": {k: float(v) for k, v in row.items()} for (t, s, e), row in wide.iterrows()}
    summary.update(hogs=args.hogs, repeats=args.repeats, calibrate=not args.uncalibrated)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(wide.to_string(float_format=lambda v: f"{v:.6g}"))


if __name__ == "__main__":
    main()
