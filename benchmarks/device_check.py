"""One prepared check of every CUDA path of odmoe on one GPU, in at most 8 minutes (issue 18).

    python -m benchmarks.device_check --device cuda --out /tmp/device_check   # on a GPU machine
    python -m benchmarks.device_check --device cpu --out /tmp/dry             # the dry run (in the test suite)

Why: a GPU is lent only to some sessions, for minutes, so the whole GPU check is prepared in advance and runs
as one command; its CPU dry run is a test, so it cannot rot. What it runs, with the project's own experiments
(``+exp=recall`` and ``+exp=e2e``, composed with Hydra; results under ``OUT/results``):

1. the embedded model, trained on the device when the cache does not hold it (``train_embedded``);
2. ``recall``: int8 and nf4 SEP shadows built on the device with bitsandbytes' kernels there, on the default
   recall workload (``conf/exp/recall.yaml``: 6 prompts x 512 tokens, none / token / token_kv), and the
   same shadows on the CPU, on the same model and prompts (the aligned modes: their replay is one pass per
   prompt; the unaligned one is reported for the device only, a greedy trajectory that diverges chaotically);
3. ``e2e`` on the device (``timing=wall`` on CUDA, on ``hardware=h200``): every system of Table 2, i.e. the
   offload engine's baselines with real copies on a side stream and stalls from CUDA events, the fully cached
   model, and the OD-MoE runtime with every rank on the one GPU (``cpu:gloo,cuda:nccl``), int8 shadow;
4. the same ``e2e`` under ``timing=modelled`` on the CPU with the same profile (the cost model's prices).

On CUDA the CPU-side runs (2's CPU half, 4) go in background processes while the device recall runs (the
modelled clock does not depend on host load, recall is not a timing), and the device ``e2e`` runs last on a
quiet host. Then one table of checks, each ``pass``, ``FAIL`` or ``info`` (a reported number with no
pass/fail rule):

* shadow: weight bytes equal on both devices; recall on the device within ``RECALL_TOL`` of the CPU's per
  aligned mode (the recall experiment's own orderings, aligned >= unaligned etc., are reported);
* engine: lossless systems agree with the fp32 reference on every token; stalls between 0 and the request's
  time (0 without offloading); the clock is ``wall`` on CUDA;
* runtime: OD-MoE's and the runtime cached model's tokens identical to the reference (the cached model's greedy
  decode); the backend is ``cpu:gloo,cuda:nccl`` on CUDA; stalls within the decode time;
* memory: every node's measured peak (``torch.cuda.max_memory_allocated`` per rank on CUDA, the ledger on CPU)
  against the analytic model, after subtracting the CUDA libraries' workspace this process measures
  (cuBLAS allocates it through PyTorch's allocator), within ``MEM_TOL`` of the model plus ``MEM_SLACK`` bytes;
* clock: the device clock against ``modelled`` per system; ``layer_overhead`` fitted on the cached model's
  wall decode, which must not be negative (a wall clock faster than the datasheet roofline means the profile's
  numbers are wrong);
* budget: the whole check within ``--budget-s`` (480 s on CUDA).

Exit status: 0 when every check passes, 1 when any fails, 2 on bad input. On ``--device cpu`` everything runs
in this process at a cut-down size on the micro model, with ``timing=measured`` standing in for the wall clock
(an offloading engine on a CPU needs a virtual clock), the CPU recall compared with itself and the modelled run
limited to the cached model (all the clock check's fit needs), so that it stays a fast test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from odmoe.errors import OdmoeError
from odmoe.hardware import load_profile
from odmoe.models.tiny import EMBEDDED
from odmoe.paths import repo_root

RECALL_TOL = {"token_kv": 0.01, "token": 0.02}  # |recall on the device - recall on the CPU| per aligned mode
MEM_TOL = 0.10  # share of the analytic model a node's measured peak may differ by ...
MEM_SLACK = 64 * 1024  # ... plus this many bytes (allocator rounding to 512-byte blocks, small temporaries)
NODES = ("main", "shadow", "worker")
HARDWARE = "h200"


@dataclass(frozen=True)
class Size:
    """How big each part of the check is on one device kind."""

    model: str
    recall: dict
    cpu_alignments: list[str]
    e2e: dict
    calibration: dict  # per-system overrides of the baselines' offline calibration
    modelled_systems: str | None  # the modelled e2e's systems (and system under test); None: every system
    workers: int
    budget_s: float | None
    parallel: bool  # CPU-side runs in background processes while the device works


SIZES = {
    "cuda": Size(
        model="tiny-mixtral",
        recall={},  # conf/exp/recall.yaml as it is: the default recall workload
        cpu_alignments=["token", "token_kv"],
        e2e={"workloads": "[[16,64],[128,64]]", "num_prompts": 1, "ppl_tokens": 32},
        # baselines' offline calibration, cut to what a few-minute check affords (the same on both clocks)
        calibration={"moe_infinity": "{eamc_traces:64}", "adapmoe": "{calib_sequences:2}"},
        modelled_systems=None,  # every system
        workers=8,
        budget_s=480.0,
        parallel=True,
    ),
    "cpu": Size(
        model="micro-mixtral",
        recall={
            "num_prompts": 1,
            "prompt_len": 8,
            "output_len": 16,
            "alignments": "[none,token_kv]",
            "figures": "false",
        },
        cpu_alignments=["none", "token_kv"],
        e2e={"workloads": "[[8,12]]", "num_prompts": 1, "ppl_tokens": 8, "figures": "false"},
        calibration={"moe_infinity": "{eamc_traces:4}", "adapmoe": "{calib_sequences:1,calib_len:32}"},
        modelled_systems="cached",  # the clock check's fit needs only the cached model
        workers=2,
        budget_s=None,
        parallel=False,
    ),
}


@dataclass
class Table:
    """The check's one table: a row per check or reported number."""

    rows: list[dict] = field(default_factory=list)

    def add(self, section: str, item: str, measured, reference=None, rule: str = "", ok: bool | None = None):
        status = "info" if ok is None else ("pass" if ok else "FAIL")
        self.rows.append(
            {
                "section": section,
                "item": item,
                "measured": _fmt(measured),
                "reference": _fmt(reference),
                "rule": rule,
                "status": status,
            }
        )

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "FAIL"]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["section", "item", "measured", "reference", "rule", "status"])


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


# ---- running the experiments ------------------------------------------------------------------------
def recall_overrides(size: Size, device: str, alignments: list[str] | None = None) -> list[str]:
    out = ["+exp=recall", f"model={size.model}", f"device={device}", "exp.precisions=[int8,nf4]"]
    out += [f"exp.{k}={v}" for k, v in size.recall.items() if not (alignments and k == "alignments")]
    if alignments:
        out.append(f"exp.alignments=[{','.join(alignments)}]")
    return out


def e2e_overrides(size: Size, device: str, timing: str) -> list[str]:
    out = ["+exp=e2e", f"model={size.model}", f"device={device}", f"timing={timing}", f"hardware={HARDWARE}"]
    if timing == "modelled" and size.modelled_systems:
        out += [f"exp.systems=[{size.modelled_systems}]", f"system={size.modelled_systems}"]
    else:
        out += [f"system.workers={size.workers}", "system.shadow.precision=int8"]
    out += [f"exp.{k}={v}" for k, v in size.e2e.items()]
    out += [f"+exp.overrides.{name}={value}" for name, value in size.calibration.items()]
    return out


def run_inline(overrides: list[str], out: Path, name: str) -> Path:
    """Run an experiment in this process (as ``python -m experiments.run`` would) into ``out/<exp>/<name>``."""
    import importlib

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from odmoe.results import Run

    with initialize_config_dir(str(repo_root() / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    exp = str(cfg.exp.name)
    run = Run(out / exp / name, exp, OmegaConf.to_container(cfg, resolve=True))
    try:
        summary = importlib.import_module(f"experiments.{exp}").run(cfg, run)
    except BaseException as e:
        run.fail(e)
        raise
    run.finish(summary)
    return run.dir


def start_cli(overrides: list[str], out: Path, name: str, log: Path) -> tuple[subprocess.Popen, Path]:
    """Start ``python -m experiments.run`` in the background; returns the process and its run directory."""
    cmd = [sys.executable, "-m", "experiments.run", *overrides, f"results_dir={out}", f"run={name}"]
    exp = overrides[0].removeprefix("+exp=")
    handle = log.open("w")
    proc = subprocess.Popen(cmd, cwd=repo_root(), stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    return proc, out / exp / name


def wait_cli(proc: subprocess.Popen, log: Path, what: str) -> None:
    if proc.wait() != 0:
        tail = " | ".join(log.read_text().strip().splitlines()[-5:])
        raise RuntimeError(f"the {what} run failed (exit {proc.returncode}; {log}): {tail}")


# ---- device facts -----------------------------------------------------------------------------------
def library_workspace_bytes(device: str) -> int:
    """Bytes PyTorch's allocator holds for CUDA libraries after one small fp32 and fp16 matmul, beyond the
    tensors themselves (cuBLAS workspaces): every rank that multiplies pays them once, and the analytic
    memory model does not count them. 0 on the CPU."""
    import torch

    if device != "cuda":
        return 0
    torch.cuda.init()
    base = torch.cuda.memory_allocated()
    held = []
    for dtype in (torch.float32, torch.float16):
        x = torch.ones(1, 96, device="cuda", dtype=dtype)
        w = torch.ones(384, 96, device="cuda", dtype=dtype)
        held += [x, w, torch.nn.functional.linear(x, w), x @ w.T]
    torch.cuda.synchronize()
    tensors = sum(-(-t.numel() * t.element_size() // 512) * 512 for t in held)
    workspace = int(torch.cuda.memory_allocated() - base - tensors)
    del held
    torch.cuda.empty_cache()
    return workspace


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def ensure_model(name: str, device: str) -> dict:
    """The embedded model's training summary, training it on ``device`` first when the cache lacks it."""
    from odmoe.models.tiny import embedded_dir, is_trained, train_embedded

    if not is_trained(name):
        print(f"device_check: training {name} on {device}", flush=True)
        return train_embedded(name, progress=False, device=device) | {"trained_now": True}
    return json.loads((embedded_dir(name) / "train_summary.json").read_text()) | {"trained_now": False}


# ---- the checks -------------------------------------------------------------------------------------
def check_shadows(table: Table, dev_dir: Path, cpu_dir: Path, device: str) -> None:
    shadows = {
        side: pd.read_csv(d / "shadows.csv").set_index("precision")
        for side, d in (("dev", dev_dir), ("cpu", cpu_dir))
    }
    for p in shadows["dev"].index:
        a, b = int(shadows["dev"].loc[p, "shadow_total"]), int(shadows["cpu"].loc[p, "shadow_total"])
        table.add("shadow", f"{p} weight bytes on {device} vs cpu", a, b, "equal", a == b)
        table.add("shadow", f"{p} build seconds on {device}", float(shadows["dev"].loc[p, "build_seconds"]))
    rec = {side: pd.read_csv(d / "recall_table.csv") for side, d in (("dev", dev_dir), ("cpu", cpu_dir))}
    cpu = {(r.precision, r.alignment): r.recall for r in rec["cpu"].itertuples()}
    for r in rec["dev"].itertuples():
        ref = cpu.get((r.precision, r.alignment))
        tol = RECALL_TOL.get(r.alignment)
        if ref is None or tol is None:
            table.add("shadow", f"{r.precision} recall {r.alignment} on {device}", float(r.recall), ref)
        else:
            ok = abs(r.recall - ref) <= tol
            table.add(
                "shadow",
                f"{r.precision} recall {r.alignment}",
                float(r.recall),
                float(ref),
                f"|d| <= {tol}",
                ok,
            )
    summary = json.loads((dev_dir / "summary.json").read_text())
    for key, value in summary.items():  # the paper's orderings: claims about the model, not the device path
        if key.startswith("check_"):
            table.add("shadow", f"ordering {key.removeprefix('check_')}", value)


def _engine_time(row) -> float:
    """Seconds of one request: TTFT plus decode (from the rates Table 2 stores)."""
    return row.ttft_ms / 1e3 + (row.output_len - 1) / row.decode_tps


def check_engine(table: Table, t2: pd.DataFrame, device: str) -> None:
    eng = t2[t2.executor == "engine"]
    want_clock = "wall" if device == "cuda" else "measured"
    for r in eng.itertuples():
        tag = f"{r.system} {r.prompt_len}x{r.output_len}"
        if not r.lossy:
            table.add(
                "engine",
                f"{tag} agreement",
                float(r.agreement),
                1.0,
                "lossless: every token",
                r.agreement == 1.0,
            )
        else:
            table.add("engine", f"{tag} agreement (lossy)", float(r.agreement))
        stall = float(r.stall_s)
        if r.system in ("cached", "cpu_only"):
            table.add("engine", f"{tag} stall s", stall, 0.0, "no copies: 0", stall == 0.0)
        else:
            total = _engine_time(r)
            table.add(
                "engine", f"{tag} stall s", stall, total, "0 <= stall <= request time", 0 <= stall <= total
            )
        if device == "cuda" and r.system != "cpu_only":
            table.add(
                "engine", f"{tag} cuda peak MB / ledger MB", float(r.cuda_peak_mb), float(r.peak_device_mb)
            )
        table.add("engine", f"{tag} clock", r.clock, want_clock, "the device's clock", r.clock == want_clock)


def check_runtime(table: Table, e2e_dir: Path, device: str) -> None:
    req = pd.read_csv(e2e_dir / "requests.csv")
    for r in req.itertuples():
        tag = f"{r.system} {r.workload}"
        table.add("runtime", f"{tag} tokens = reference", bool(r.exact), True, "identical", bool(r.exact))
        if r.system == "odmoe":
            ok = 0 <= r.stall_s <= r.decode_s + r.ttft_s
            table.add(
                "runtime", f"{tag} stall s", float(r.stall_s), float(r.decode_s), "0 <= stall <= time", ok
            )
            table.add("runtime", f"{tag} decode tok/s", float(r.decode_tok_s))
    main = [
        json.loads(line) for line in (e2e_dir / "cluster-odmoe" / "requests.jsonl").read_text().splitlines()
    ]
    want = "cuda:nccl" if device == "cuda" else "cpu:gloo"  # gloo alone reads "cpu:gloo,cuda:gloo"
    for m in main[:1]:
        backends = m["backend"].split(",")
        ok = want in backends and "cpu:gloo" in backends
        table.add(
            "runtime", "process group backend", m["backend"], want, "includes it (messages: cpu:gloo)", ok
        )
        table.add(
            "runtime",
            "main node device",
            m["device"],
            device,
            "on the device",
            m["device"].startswith(device),
        )


def check_memory(table: Table, e2e_dir: Path, workspace: int) -> None:
    mem = pd.read_csv(e2e_dir / "memory.csv")
    mem = mem[(mem.model != "mixtral-8x7b") & mem.measured.notna()]
    for r in mem.itertuples():
        if r.node not in NODES:
            table.add("memory", f"{r.node} {r.workload} bytes", int(r.measured), int(r.model_bytes))
            continue
        net = r.measured - workspace
        ok = abs(net - r.model_bytes) <= MEM_TOL * r.model_bytes + MEM_SLACK
        rule = f"|measured - {workspace} - model| <= {MEM_TOL:g} model + {MEM_SLACK}"
        table.add(
            "memory", f"{r.node} {r.workload} peak bytes", int(r.measured), int(r.model_bytes), rule, ok
        )


def check_clock(
    table: Table, dev: pd.DataFrame, modelled: pd.DataFrame, layers: int, overhead: float
) -> dict:
    key = ["system", "executor", "prompt_len", "output_len"]
    both = dev.merge(modelled, on=key, suffixes=("_dev", "_mod"))
    fits = {}
    for r in both.itertuples():
        tag = f"{r.system}/{r.executor} {r.prompt_len}x{r.output_len}"
        table.add(
            "clock",
            f"{tag} decode tok/s {r.clock_dev} vs modelled",
            float(r.decode_tps_dev),
            float(r.decode_tps_mod),
        )
        if r.system == "cached":
            # a cached layer costs layer_overhead + roofline on either executor (the engine charges the overhead
            # as main_share with attention and the rest with the layer's first expert): the overhead that makes
            # the modelled decode time equal the measured one
            fit = overhead + (1 / r.decode_tps_dev - 1 / r.decode_tps_mod) / layers
            fits[tag] = fit
            table.add(
                "clock",
                f"layer_overhead fitted on {tag} (s)",
                fit,
                overhead,
                ">= 0 (wall >= roofline)",
                fit >= 0,
            )
    return fits


# ---- main ---------------------------------------------------------------------------------------------
def run_check(device: str, out: Path, budget_s: float | None = None) -> Table:
    """Run every part and return the table (see the module docstring). A part that crashes is a ``FAIL`` row
    (its traceback on stderr) and the checks that need its results are skipped: one GPU session is one try."""
    t_start = time.perf_counter()
    if device not in SIZES:
        raise OdmoeError(f"unknown --device {device!r}; use cuda or cpu")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise OdmoeError(
                "--device cuda but no CUDA device is visible; run on a GPU machine or use --device cpu"
            )
    size = SIZES[device]
    budget_s = size.budget_s if budget_s is None else budget_s
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results"
    table = Table()
    phases: dict[str, float] = {}
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def attempt(name: str, fn):
        """``fn()``, or None after a FAIL row naming the crash."""
        t = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - every crash is a finding of the check
            traceback.print_exc()
            table.add("run", name, f"crashed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", ok=False)
            return None
        finally:
            phases[name] = time.perf_counter() - t

    workspace = library_workspace_bytes(device)
    train = ensure_model(size.model, device)
    phases["model"] = time.perf_counter() - t_start
    table.add("setup", "device", device_name(device))
    table.add("setup", f"{size.model} trained here ({train.get('device', 'cpu')})", train["trained_now"])
    table.add("setup", f"{size.model} train seconds", float(train["train_seconds"]))
    table.add("setup", "CUDA library workspace bytes per process", workspace)

    cpu_side = {
        "recall-cpu": recall_overrides(size, "cpu", size.cpu_alignments),
        "e2e-modelled": e2e_overrides(size, "cpu", "modelled"),
    }
    background: dict[str, tuple] = {}
    if size.parallel:
        for name, ov in cpu_side.items():
            background[name] = start_cli(ov, results, f"{stamp}-{name}", out / f"{name}.log")
    dirs = {
        "recall-dev": attempt(
            f"recall on {device}",
            lambda: run_inline(recall_overrides(size, device), results, f"{stamp}-recall-{device}"),
        )
    }
    for name, (proc, d) in background.items():
        dirs[name] = attempt(
            f"{name} (background)",
            lambda proc=proc, name=name, d=d: wait_cli(proc, out / f"{name}.log", name) or d,
        )
    if not size.parallel:  # dry run: the CPU recall is the device recall; the modelled run in this process
        dirs["recall-cpu"] = dirs["recall-dev"]
        dirs["e2e-modelled"] = attempt(
            "e2e-modelled", lambda: run_inline(cpu_side["e2e-modelled"], results, f"{stamp}-e2e-modelled")
        )
    timing = "wall" if device == "cuda" else "measured"
    dirs["e2e-dev"] = attempt(
        f"e2e on {device}",
        lambda: run_inline(e2e_overrides(size, device, timing), results, f"{stamp}-e2e-{device}"),
    )

    if dirs["recall-dev"] and dirs["recall-cpu"]:
        attempt("shadow checks", lambda: check_shadows(table, dirs["recall-dev"], dirs["recall-cpu"], device))
    if dirs["e2e-dev"]:
        t2 = pd.read_csv(dirs["e2e-dev"] / "table2.csv")
        attempt("engine checks", lambda: check_engine(table, t2, device))
        attempt("runtime checks", lambda: check_runtime(table, dirs["e2e-dev"], device))
        attempt("memory checks", lambda: check_memory(table, dirs["e2e-dev"], workspace))
        if dirs["e2e-modelled"]:
            modelled = pd.read_csv(dirs["e2e-modelled"] / "table2.csv")
            overhead = float(load_profile(HARDWARE).layer_overhead)
            layers = EMBEDDED[size.model].config["num_hidden_layers"]
            attempt("clock checks", lambda: check_clock(table, t2, modelled, layers, overhead))
    for name, seconds in phases.items():
        table.add("budget", f"{name} s", round(seconds, 1))
    total = time.perf_counter() - t_start
    within = None if budget_s is None else total <= budget_s
    table.add("budget", "whole check s", round(total, 1), budget_s, "<= budget" if budget_s else "", within)
    (out / "dirs.json").write_text(json.dumps({k: str(v) for k, v in dirs.items()}, indent=2))
    return table


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub markdown table of ``frame`` (no dependency on ``tabulate``)."""
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write(table: Table, out: Path, device: str) -> str:
    """Write ``checks.csv``, ``checks.md`` and ``summary.json`` under ``out``; returns the printed text."""
    frame = table.frame()
    frame.to_csv(out / "checks.csv", index=False)
    failed = table.failed
    checks = int((frame.status != "info").sum())
    head = f"device check on {device}: {checks - len(failed)} of {checks} checks passed, {len(failed)} failed"
    text = f"{head}\n\n{markdown(frame)}\n"
    (out / "checks.md").write_text(text)
    summary = {
        "device": device,
        "rows": len(frame),
        "checks": checks,
        "failed": [f"{r['section']}: {r['item']}" for r in failed],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.device_check", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--device", default="cuda", help="cuda (the real check) or cpu (the dry run)")
    ap.add_argument("--out", type=Path, default=repo_root() / "results" / "benchmarks" / "device_check")
    ap.add_argument("--budget-s", type=float, default=None, help="fail when the whole check takes longer")
    args = ap.parse_args(argv)
    try:
        table = run_check(args.device, args.out, args.budget_s)
    except OdmoeError as e:
        print(f"odmoe: error: {e}", file=sys.stderr)
        return 2
    print(write(table, args.out, args.device))
    return 1 if table.failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
