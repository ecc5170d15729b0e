"""Soak: 2,000 decode tokens on the OD-MoE runtime, every rank's memory sampled from outside: flat after warm-up.

    python -m benchmarks.soak [--tokens 2000] [--prompt-len 24] [--period 0.5] [--name default] [overrides]

One local cluster (``odmoe.launch.spawn_local``: main, shadow, ``system.workers`` workers) on the embedded
``tiny-mixtral`` with ``timing=modelled`` and ``hardware=cpu-emulated`` (deterministic, nothing sleeps), any
Hydra overrides after the options (``system.workers=4``, ``model=micro-mixtral``, ...). The model's context
(``max_position_embeddings``, 1,024 for tiny-mixtral) cannot hold one 2,000-token request, so the tokens are
split into the fewest equal requests that fit, and never fewer than three (tiny-mixtral: 667 + 667 + 666
after a 24-token prompt), served one after the other by the same cluster. Every request decodes the same
prompt, so every request repeats the first's work exactly: the first request is the warm-up (first-time
allocations, e.g. the main node's first results table), and the last can be compared like with like with
the one before it.

While the cluster runs, this process samples every ``--period`` seconds (wall clock, ``time.monotonic`` of
this process) each rank's resident set (``VmRSS`` of ``/proc/<pid>/status``; pids from the ``rank<r>.pid``
files the ranks write) and the main node's ``progress`` file (tokens generated so far over all requests, the
request being served, its mailbox size and its emulated-device ledger; written by ``odmoe/runtime/main.py``).
Nothing else inside the ranks changes to be measured.

Results under ``results/benchmarks/soak/<name>/`` (or ``--out``): ``samples.csv`` (one row per sample and
rank: ``t_s``, ``rank``, ``role``, ``pid``, ``rss_bytes``, ``tokens_done``, ``request``, and for the main node
``mailbox``/``device_bytes``), ``cluster/`` (the runtime's out dir: ``requests.jsonl``, ``layers.csv``, rank
logs), ``meta.json`` (arguments, spec, git commit, package versions, machine, load average) and, last and
only on success, ``summary.json``.

Verdict (``summary.json``; docs/runtime.md#soak). Growth after warm-up, per rank: the peak RSS over the last
request minus the peak over the request before it (the first request is the warm-up). A process whose
allocator keeps what it freed climbs to its high-water mark while warming up and stays there; what a request
legitimately holds until it ends (its KV cache, the main node's per-layer records) is the same in every
request, so the peaks match; whatever the runtime keeps from one request to the next raises each peak by that
much: a leak of x bytes a token shows as ~667 x. A rank is *flat* when the growth is at most
``--threshold-mib`` (default 2 MiB, ~3 KiB a token: one leaked KV row of the main node per token, 6 KiB on
tiny-mixtral, or a few leaked runtime messages per token would exceed it). The
mailboxes are checked exactly, in messages: the main node's messages left after the last request must not
exceed those after the first, and no node's decode peak may exceed its earlier requests' by more than
``MAILBOX_SLACK`` (arrival-order jitter; a leak adds one per leaked message, hundreds a request). The
verdict is ``flat`` when both hold, ``grows`` otherwise. RSS at token ~100 and at the end (~2,000) are
reported as well; their difference includes the warm-up and the end state's larger KV cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import pandas as pd

from odmoe.errors import OdmoeError
from odmoe.paths import repo_root

MIB = 1 << 20
MAILBOX_SLACK = 2  # messages a node's decode peak may exceed its earlier requests' peaks by


# ---- reading a rank from outside ----------------------------------------------------------------
def rss_bytes(pid: int) -> int | None:
    """Resident set of process ``pid`` (``VmRSS``), or None once it has exited (a zombie has no VmRSS)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB (KiB)
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_progress(out_dir: Path) -> dict | None:
    """The main node's ``progress`` line (written atomically), or None before its first write."""
    try:
        return json.loads((out_dir / "progress").read_text())
    except (OSError, ValueError):
        return None


class Sampler(threading.Thread):
    """Every ``period`` seconds: each rank's RSS and the main node's progress, as rows of ``samples``."""

    def __init__(self, out_dir: Path, world: int, period: float, total_tokens: int, show: bool = True):
        super().__init__(daemon=True)
        self.out_dir, self.world, self.period = out_dir, world, period
        self.samples: list[dict] = []
        self.pids: dict[int, int] = {}
        self.halt = threading.Event()
        self.total_tokens, self.show = total_tokens, show

    def _pid(self, rank: int) -> int | None:
        if rank not in self.pids:
            try:
                self.pids[rank] = int((self.out_dir / f"rank{rank}.pid").read_text())
            except (OSError, ValueError):
                return None
        return self.pids[rank]

    def sample(self, t0: float) -> None:
        from odmoe.runtime.layout import Layout

        t = time.monotonic() - t0
        progress = read_progress(self.out_dir) or {}
        for rank in range(self.world):
            pid = self._pid(rank)
            rss = rss_bytes(pid) if pid is not None else None
            if rss is None:
                continue
            self.samples.append(
                {
                    "t_s": round(t, 3),
                    "rank": rank,
                    "role": Layout.name(rank).split(" (")[0],
                    "pid": pid,
                    "rss_bytes": rss,
                    "tokens_done": int(progress.get("tokens", 0)),
                    "request": int(progress.get("request", -1)),
                    "mailbox": progress.get("mailbox") if rank == 0 else None,
                    "device_bytes": progress.get("device_bytes") if rank == 0 else None,
                }
            )

    def run(self) -> None:
        from tqdm import tqdm

        t0 = time.monotonic()
        with tqdm(total=self.total_tokens, desc="soak", unit="tok", disable=not self.show) as bar:
            while not self.halt.is_set():
                tick = time.monotonic()
                self.sample(t0)
                if self.samples:
                    bar.update(self.samples[-1]["tokens_done"] - bar.n)
                self.halt.wait(max(0.0, self.period - (time.monotonic() - tick)))


# ---- the plan and the summary -----------------------------------------------------------------
def plan_requests(total: int, prompt_len: int, context: int | None) -> list[int]:
    """Output lengths of the fewest equal requests (at least three) that total ``total`` tokens and each fit
    the context with the prompt; the remainder goes to the first requests."""
    if total < 2 or prompt_len < 1:
        raise OdmoeError(f"--tokens must be >= 2 and --prompt-len >= 1, got {total} and {prompt_len}")
    room = (context - prompt_len) if context is not None else total
    if room < 1:
        raise OdmoeError(
            f"a prompt of {prompt_len} tokens leaves no room in the model's context of {context}"
        )
    count = max(3, math.ceil(total / room))
    if total / count > room or total < count:
        raise OdmoeError(f"{total} tokens cannot be split into requests of at most {room} tokens")
    return [total // count + (i < total % count) for i in range(count)]


def _at(frame: pd.DataFrame, tokens: int) -> pd.Series | None:
    """The first sample at or after ``tokens`` tokens, or None."""
    after = frame[frame["tokens_done"] >= tokens]
    return after.iloc[0] if len(after) else None


def summarize(
    samples: pd.DataFrame,
    output_lens: list[int],
    at_tokens: int = 100,
    threshold_bytes: int = 2 * MIB,
    requests: list[dict] | None = None,
) -> dict:
    """Per rank: RSS at ~``at_tokens`` and at the end, each request's peak RSS, the growth after warm-up
    (the last request's peak minus the one before) and whether it stays within ``threshold_bytes``; the
    mailboxes."""
    ranks = {}
    last = len(output_lens) - 1
    for rank, frame in samples.sort_values("t_s").groupby("rank"):
        at, end = _at(frame, at_tokens), frame.iloc[-1]
        # the request the main node was serving (prefill to its summary), as its progress file said;
        # samples before its first write (loading the model, joining) have request -1 and count in none
        peaks = frame[frame["request"] >= 0].groupby("request")["rss_bytes"].max()
        growth = (
            int(peaks[last] - peaks[last - 1]) if last >= 1 and {last - 1, last} <= set(peaks.index) else None
        )
        ranks[str(rank)] = {
            "role": str(frame["role"].iloc[0]),
            "samples": int(len(frame)),
            "tokens_at_start": int(at["tokens_done"]) if at is not None else None,
            "rss_at_start": int(at["rss_bytes"]) if at is not None else None,
            "tokens_at_end": int(end["tokens_done"]),
            "rss_at_end": int(end["rss_bytes"]),
            "rss_end_minus_start": int(end["rss_bytes"] - at["rss_bytes"]) if at is not None else None,
            "peak_rss_by_request": [int(peaks[i]) if i in peaks else None for i in range(last + 1)],
            "growth_after_warmup": growth,
            "flat": growth is not None and growth <= threshold_bytes,
        }
    out: dict = {
        "tokens": sum(output_lens),
        "requests": output_lens,
        "at_tokens": at_tokens,
        "threshold_bytes": int(threshold_bytes),
        "ranks": ranks,
        "rss_flat": bool(ranks) and all(r["flat"] for r in ranks.values()),
    }
    if requests:
        main = [r["mailbox_main"] for r in requests]
        peaks = [[m["peak"], *r["mailbox_peak_workers"]] for m, r in zip(main, requests, strict=True)]
        out["mailbox"] = {
            "main_left_by_request": [m["left"] for m in main],
            "main_peak_by_request": [m["peak"] for m in main],
            "main_dropped_by_request": [m["dropped"] for m in main],
            "worker_peaks_by_request": [r["mailbox_peak_workers"] for r in requests],
            "worker_dropped_by_request": [r["mailbox_dropped_workers"] for r in requests],
        }
        # a message or two of arrival-order jitter between requests; a leak adds hundreds a request
        out["mailbox_bounded"] = main[-1]["left"] <= main[0]["left"] and all(
            p <= max(earlier) + MAILBOX_SLACK for p, *earlier in zip(peaks[-1], *peaks[:-1], strict=True)
        )
    out["verdict"] = "flat" if out["rss_flat"] and out.get("mailbox_bounded", True) else "grows"
    return out


# ---- the run ----------------------------------------------------------------------------------
def _compose(overrides: list[str]):
    from odmoe.launch import compose_config
    from odmoe.schema import validate

    cfg = compose_config(["model=tiny-mixtral", "hardware=cpu-emulated", "timing=modelled", *overrides])
    validate(cfg)
    return cfg


def _check_model(cfg) -> None:
    """The embedded model must be trained already: the soak measures the runtime, not a training run."""
    from odmoe.models.tiny import EMBEDDED, embedded_dir, is_trained

    name = str(cfg.model.name)
    if not cfg.model.get("path") and name in EMBEDDED and not is_trained(name):
        raise OdmoeError(
            f"embedded model {name} is not trained in {embedded_dir(name)}; train it first with "
            f"python -m experiments.run +exp=pretrain model={name}"
        )


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from odmoe.data.prompts import load_prompts
    from odmoe.launch import layout_for, spawn_local, spec_from_cfg
    from odmoe.results import git_commit, machine, package_versions

    cfg = _compose(args.overrides)
    _check_model(cfg)
    spec = spec_from_cfg(cfg, cfg.system, [])
    path = spec["model"]["path"]
    context = getattr(
        AutoConfig.from_pretrained(path, local_files_only=True), "max_position_embeddings", None
    )
    output_lens = plan_requests(args.tokens, args.prompt_len, context)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    (prompt,) = load_prompts(cfg.data, tok, args.prompt_len, 1)
    spec["jobs"] = [
        {"id": f"{prompt.id}#{i}", "prompt": list(prompt.token_ids), "output_len": n}
        for i, n in enumerate(output_lens)
    ]
    world = layout_for(spec).world_size
    out = args.out if args.out is not None else repo_root() / "results" / "benchmarks" / "soak" / args.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # a stale summary must not pass for this run's
    meta = {
        "command": " ".join(["python -m benchmarks.soak", *sys.argv[1:]]) if args.argv is None else args.argv,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "context": context,
        "requests": output_lens,
        "prompt_id": prompt.id,
        "spec": {k: v for k, v in spec.items() if k != "jobs"},
        "world_size": world,
        "clock": "samples: time.monotonic of the benchmark process (wall); the runtime: timing=modelled",
        "git": git_commit(),
        "versions": package_versions(),
        "machine": machine(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    sampler = Sampler(out / "cluster", world, args.period, sum(output_lens), show=not args.quiet)
    (out / "cluster").mkdir(exist_ok=True)
    for stale in (out / "cluster").glob("rank*.pid"):
        stale.unlink()
    (out / "cluster" / "progress").unlink(missing_ok=True)
    t0 = time.monotonic()
    sampler.start()
    try:
        results = spawn_local(spec, out / "cluster")
    finally:
        sampler.halt.set()
        sampler.join()
    wall = time.monotonic() - t0
    samples = pd.DataFrame(sampler.samples)
    samples.to_csv(out / "samples.csv", index=False)
    if samples.empty:
        raise RuntimeError("no sample was taken: the ranks never wrote their pid files")
    summary = summarize(samples, output_lens, args.at_tokens, int(args.threshold_mib * MIB), results)
    summary.update(
        model=spec["model"]["name"],
        prompt_len=args.prompt_len,
        context=context,
        workers=world - 2,
        period_s=args.period,
        wall_s=round(wall, 1),
        loadavg_before=meta["loadavg_before"],
        loadavg_after=[round(x, 2) for x in os.getloadavg()],
        finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        decode_tok_s_modelled=[r["decode_tok_s"] for r in results],
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.quiet:
        print(table(summary))
        print(f"verdict: {summary['verdict']} ({out / 'summary.json'})")
    return summary


def table(summary: dict) -> str:
    """The per-rank markdown table of docs/runtime.md#soak."""
    mib = lambda b: "-" if b is None else f"{b / MIB:.1f}"  # noqa: E731
    lines = [
        f"| rank | RSS at token ~{summary['at_tokens']} (MiB) | RSS at the end (MiB) | difference (MiB) "
        "| peak RSS per request (MiB) | growth after warm-up (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for rank, r in summary["ranks"].items():
        lines.append(
            f"| {r['role']} {rank} | {mib(r['rss_at_start'])} (token {r['tokens_at_start']}) "
            f"| {mib(r['rss_at_end'])} (token {r['tokens_at_end']}) | {mib(r['rss_end_minus_start'])} "
            f"| {' / '.join(mib(p) for p in r['peak_rss_by_request'])} | {mib(r['growth_after_warmup'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000, help="decode tokens in all (default 2000)")
    parser.add_argument("--prompt-len", type=int, default=24, help="prompt tokens of every request")
    parser.add_argument("--period", type=float, default=0.5, help="seconds between samples (default 0.5)")
    parser.add_argument("--at-tokens", type=int, default=100, help="the early point reported (default 100)")
    parser.add_argument(
        "--threshold-mib", type=float, default=2.0, help="largest flat growth (MiB, default 2)"
    )
    parser.add_argument("--name", default="default", help="results/benchmarks/soak/<name>")
    parser.add_argument("--out", type=Path, default=None, help="result directory (overrides --name)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or table")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. system.workers=4")
    args = parser.parse_args(argv)
    args.argv = None if argv is None else " ".join(["python -m benchmarks.soak", *argv])
    from odmoe.launch import ClusterFailed

    try:
        if args.period <= 0:
            raise OdmoeError(f"--period must be a positive number of seconds, got {args.period}")
        return run(args)
    except OdmoeError as e:
        print(f"odmoe: error: {e}", file=sys.stderr)
        sys.exit(2)
    except ClusterFailed as e:
        print(f"odmoe: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
