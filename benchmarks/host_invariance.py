"""Host invariance of the virtual clock: the same Table 2 run on a quiet host and beside CPU hogs.

    python benchmarks/host_invariance.py [--hogs 2] [--out results/benchmarks/host_invariance]

For each clock (``modelled``, ``measured``) it runs ``+exp=e2e 'exp.systems=[cached,odmoe,
mixtral_offloading]'`` on ``hardware=cpu-emulated`` twice: alone, then with ``--hogs`` busy processes
(pure-Python spin loops, one per core) running for exactly as long as the run. It writes ``runs.csv`` (decode
and output tok/s and TTFT per system, clock and condition) and ``summary.json`` (per system and clock, the
largest relative difference between the quiet and the loaded run) and prints the table.

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


def run_e2e(timing: str, name: str, results: Path, hogs: int) -> pd.DataFrame:
    cmd = [
        sys.executable, "-m", "experiments.run", "+exp=e2e", f"timing={timing}", "hardware=cpu-emulated",
        f"exp.systems={SYSTEMS}", "exp.workloads=[[16,64]]", "exp.num_prompts=2",
        f"results_dir={results}", f"run={name}",
    ]  # fmt: skip
    procs = []
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
    t2 = pd.read_csv(results / "e2e" / name / "table2.csv")
    return t2.assign(timing=timing, condition="loaded" if hogs else "quiet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hogs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "host_invariance")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    frames = [
        run_e2e(timing, f"{stamp}-{timing}-{'loaded' if hogs else 'quiet'}", args.out, hogs)
        for timing in ("modelled", "measured")
        for hogs in (0, args.hogs)
    ]
    runs = pd.concat(frames, ignore_index=True)
    cols = ["timing", "condition", "system", "executor", "ttft_ms", "decode_tps", "output_tps"]
    runs[cols].to_csv(args.out / "runs.csv", index=False)
    wide = runs.pivot_table(index=["timing", "system", "executor"], columns="condition", values="decode_tps")
    wide["rel_diff"] = (wide["loaded"] - wide["quiet"]).abs() / wide["quiet"]
    summary = {f"{t}/{s}/{e}": float(d) for (t, s, e), d in wide["rel_diff"].items()}
    summary["hogs"] = args.hogs
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(wide.to_string(float_format=lambda v: f"{v:.6g}"))


if __name__ == "__main__":
    main()
