"""Start an OD-MoE cluster: the ``torchrun`` entry point and the single-machine spawner.

One machine (main + shadow + W workers, here W = 8)::

    python -m odmoe.torchrun --nproc-per-node 10 -m odmoe.launch hardware=cpu-emulated system=odmoe \\
        --prompt-len 16 --output-len 64 --num-prompts 2 --out results/launch/demo

Several machines: the tested recipe of docs/runtime.md ("Several machines"): the same torchrun command on
each machine with ``ODMOE_NODE_RANK`` (ranks are renumbered by machine, then local rank, so the main node
and the shadow run on machine 0 whatever order torchrun's c10d rendezvous chose), ``ODMOE_STORE`` (machine
0's rendezvous store), ``ODMOE_NNODES`` and, optionally, ``GLOO_SOCKET_IFNAME`` (by default the interface
that reaches the store).

Every rank composes the same Hydra configuration from its arguments (``conf/``; ``system`` defaults
to ``odmoe``). Rank 0, the main node, writes ``requests.jsonl``, ``layers.csv`` (and logits, when
asked) under ``--out``. The runner does not need torchrun: :func:`spawn_local` starts the ranks as
local processes (forked from a server that has imported torch once) with the same environment torchrun
gives them (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` of a store the spawner hosts),
watches them, and on any failure ends every one (no orphans: each child also dies with its parent) and
raises :class:`ClusterFailed` with the first failing rank's one-line message.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from odmoe.errors import OdmoeError
from odmoe.paths import repo_root
from odmoe.runtime.net import check_machines_joined, store_address


class ClusterFailed(RuntimeError):
    """A rank of the cluster failed; the message names it (role and rank) and says what happened."""


# ---- spec: everything a rank needs, as plain data ----------------------------------------------
def spec_from_cfg(cfg, system: Any, jobs: list[dict], collect_logits: bool = False) -> dict:
    """The plain-dict run spec of a Hydra config (``cfg.model``, ``cfg.hardware``, ``cfg.device``), a
    system config and a list of requests ``{"id", "prompt": [token ids], "output_len"}``."""
    from omegaconf import OmegaConf

    from odmoe.models.load import resolve_path
    from odmoe.models.tiny import EMBEDDED, ensure_embedded

    m = cfg.model
    path = m.get("path")
    directory = resolve_path(path) if path else ensure_embedded(m.name) if m.name in EMBEDDED else None
    if directory is None:
        raise OdmoeError(f"model {m.name!r} is not embedded; pass model.path=<local directory>")
    from odmoe.clock import resolve_timing
    from odmoe.hardware import profile_from_config
    from odmoe.schema import check_device, check_system

    hardware = OmegaConf.to_container(cfg.hardware, resolve=True)
    system = OmegaConf.to_container(system, resolve=True) if not isinstance(system, dict) else system
    check_system(system)
    device = str(cfg.get("device", "auto"))
    check_device(device, str(hardware.get("name")), bool(hardware.get("emulated")))
    timing = resolve_timing(cfg.get("timing"), profile_from_config(hardware), device)
    if timing.virtual:
        device = "cpu"
    return {
        "model": {
            "name": str(m.name),
            "path": str(directory),
            "dtype": str(m.get("dtype", "float32")),
            "decode": OmegaConf.to_container(m.decode) if m.get("decode") else None,
        },
        "hardware": hardware,
        "timing": asdict(timing),
        "system": system,
        "device": device,
        "seed": int(cfg.get("seed", 0)),
        "threads": int(system.get("threads", 1)),
        "jobs": jobs,
        "collect_logits": bool(collect_logits),
    }


def layout_for(spec: dict):
    """The checked layout of a spec, from the model's config alone (a meta-device model, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from odmoe.models.adapter import MoEAdapter
    from odmoe.runtime.layout import Layout

    config = AutoConfig.from_pretrained(spec["model"]["path"], local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = MoEAdapter(model)
    s = spec["system"]
    return Layout.build(
        s.get("workers", 8),
        adapter.top_k,
        adapter.num_experts,
        adapter.moe_layers,
        s.get("group_size"),
        s.get("slots"),
    )


# ---- one rank ---------------------------------------------------------------------------------
def run_rank(spec: dict, out_dir: Path | None) -> None:
    """Run this process's role until the cluster stops; never returns (exits the process)."""
    import torch

    from odmoe.runtime.layout import MAIN, SHADOW
    from odmoe.runtime.node import connect

    torch.set_num_threads(int(spec.get("threads", 1)))
    try:
        layout = layout_for(spec)
        node = connect(spec, layout, out_dir)
    except OdmoeError as e:
        _bad_input(e)
    node.start_watchdog()
    if out_dir is not None:
        (out_dir / f"rank{node.rank}.pid").write_text(f"{os.getpid()}\n")
    try:
        if node.rank == MAIN:
            from odmoe.runtime.main import MainNode as Role
        elif node.rank == SHADOW:
            from odmoe.runtime.shadow import ShadowNode as Role
        else:
            from odmoe.runtime.worker import WorkerNode as Role
        role = Role(node)
        node.clock.reset()  # every rank's time 0: setup is not the system's time
        node.barrier("ready", float(spec["system"].get("startup_timeout_s", 600)))
        # from now on a store that stops answering (its machine gone) must not block a rank for longer
        node.store.set_timeout(datetime.timedelta(seconds=node.timeout))
        role.run()
        node.comm.stopping = True
        node.comm.flush()
        node.barrier("stopped", node.timeout)
    except BaseException as e:  # noqa: BLE001 - every failure ends the cluster with one message
        node.fail(e)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_world(layout) -> None:
    """The processes torchrun started (``WORLD_SIZE``) are the ones the layout needs."""
    world = int(os.environ.get("WORLD_SIZE", layout.world_size))
    if world != layout.world_size:
        raise OdmoeError(
            f"{world} processes were started but the layout needs {layout.world_size} "
            f"(main + shadow + {layout.num_workers} workers); use --nproc-per-node/--nnodes giving "
            f"{layout.world_size} in all, or system.workers={world - 2}"
        )


def _bad_input(error: OdmoeError) -> None:
    """Every rank sees the same bad input; only each machine's first local rank says so (one line per
    machine, not one per rank); exit 2.

    That rank speaks before anything else (the rendezvous store may be gone already), then marks its line
    in the store. Every rank then waits (up to 20 s) until every machine's line is out: a rank that exits
    first lets torchrun end its machine, which terminates that machine's rank 0 or, on machine 0, takes the
    store away from the agents of the others, which then terminate theirs."""
    first = os.environ.get("LOCAL_RANK", "0") == "0"
    if first:
        print(f"odmoe: error: {error}", file=sys.stderr, flush=True)
    machines = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if machines > 1 or int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        said = f"odmoe/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/bad_input"
        try:
            import torch.distributed as dist

            store = dist.TCPStore(*store_address(), is_master=False, timeout=datetime.timedelta(seconds=20))
            if first:
                store.set(f"{said}/{os.environ.get('GROUP_RANK', '0')}", "said")
            store.wait([f"{said}/{m}" for m in range(machines)])
        except Exception:  # noqa: BLE001 - no store, or a machine never spoke: exit anyway
            pass
    sys.stderr.flush()
    os._exit(2)


# ---- the single-machine spawner ---------------------------------------------------------------
# CPU ranks are forked from one server process that has imported torch, transformers and the roles once
# (the standard library's forkserver), not started as fresh interpreters: each fresh interpreter spends
# ~5 s of CPU on imports, which on a 2-core laptop is most of a small cluster's start-up. Fork is safe
# there because the server has run no torch op (no thread pool). Ranks that may touch CUDA (device cuda,
# or auto where CUDA is available) start as fresh interpreters ("spawn"): nothing imported before them
# can have initialized CUDA.
_PRELOAD = [
    "torch",
    "transformers",
    "odmoe.launch",
    "odmoe.models.load",
    "odmoe.runtime.main",
    "odmoe.runtime.shadow",
    "odmoe.runtime.worker",
]


_NEVER_STARTED = (
    "it ended before it started: a script that starts a cluster must guard its entry point with "
    "`if __name__ == '__main__':` (each rank re-imports it, as multiprocessing does)"
)


def _rank_process(argv: list[str], env: dict, log_path: str) -> None:
    """Body of one rank: the environment, session and log that ``python -m odmoe.launch`` under
    torchrun would have, then :func:`main`."""
    os.setsid()  # Ctrl-C reaches the spawner, which ends the ranks itself
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.environ.clear()
    os.environ.update(env)
    os.chdir(repo_root())
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    # tqdm's default lock is a multiprocessing semaphore, registered with the spawner's resource tracker;
    # a rank ends with os._exit, so the spawner would report it leaked. A rank needs a thread lock only.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    main(argv)


def _rank_context(device: str):
    import multiprocessing

    import torch

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if not on_cpu:
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def spawn_local(spec: dict, out_dir: str | Path, timeout: float | None = None) -> list[dict]:
    """Run ``spec`` on a local cluster of processes; return the main node's per-request results.

    ``timeout`` bounds how long the spawner waits for the remaining ranks after the first failure
    (default: the spec's ``system.timeout_s``) before it kills them.
    """
    import torch.distributed as dist

    from odmoe.runtime.layout import Layout
    from odmoe.runtime.node import process_stopped
    from odmoe.schema import check_system

    check_system(spec["system"])  # a bad system config fails here, not after 2 + W model loads
    layout = layout_for(spec)  # impossible layouts fail here, before anything starts
    world = layout.world_size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = [p.name for pattern in ("logits-*.npy", "rank*.pid") for p in out_dir.glob(pattern)]
    for old in ["requests.jsonl", "layers.csv", "failure.txt", "status", "progress", *stale]:
        (out_dir / old).unlink(missing_ok=True)
    spec = dict(spec, run_id=uuid.uuid4().hex[:12])
    (out_dir / "spec.json").write_text(json.dumps(spec))
    timeout = float(spec["system"].get("timeout_s", 60) if timeout is None else timeout)
    startup = float(spec["system"].get("startup_timeout_s", 600))
    store = dist.TCPStore(
        "127.0.0.1", 0, world, True, wait_for_workers=False, timeout=datetime.timedelta(seconds=startup)
    )
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(store.port),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        TORCHELASTIC_USE_AGENT_STORE="True",
        TORCHELASTIC_RESTART_COUNT="0",
        TORCHELASTIC_RUN_ID=spec["run_id"],
        OMP_NUM_THREADS=str(spec.get("threads", 1)),
    )
    ctx = _rank_context(spec["device"])
    procs = []
    argv = ["--spec", str(out_dir / "spec.json"), "--out", str(out_dir)]
    try:
        for r in range(world):
            log_path = str(out_dir / f"rank{r}.log")
            rank_env = env | {"RANK": str(r), "LOCAL_RANK": str(r)}
            proc = ctx.Process(target=_rank_process, args=(argv, rank_env, log_path), name=f"rank{r}")
            proc.start()
            procs.append(proc)
        failed_at = None
        abort_key = f"odmoe/{spec['run_id']}/abort"
        while True:
            codes = [p.exitcode for p in procs]
            if all(c == 0 for c in codes):
                break
            if failed_at is None and (any(c not in (None, 0) for c in codes) or store.check([abort_key])):
                failed_at = time.monotonic()
            if failed_at is not None:
                for p, c in zip(procs, codes, strict=True):
                    if c is None and process_stopped(p.pid):
                        p.kill()
            if failed_at is not None and (
                all(c is not None for c in codes) or time.monotonic() - failed_at > timeout + 2
            ):
                break
            time.sleep(0.1)
    finally:
        killed = []
        for r, p in enumerate(procs):
            if p.exitcode is None:
                p.kill()
                killed.append(r)
            p.join()
    codes = [p.exitcode for p in procs]
    if any(codes):
        reason = store.get(abort_key).decode() if store.check([abort_key]) else None
        if reason is None:
            bad = [r for r, c in enumerate(codes) if c] or [0]
            r = bad[0]
            log = out_dir / f"rank{r}.log"
            tail = log.read_text().strip().splitlines()[-3:] if log.exists() else [_NEVER_STARTED]
            reason = f"{Layout.name(r)} exited with code {codes[r]}: {' | '.join(tail)}"
        extra = f"; killed {', '.join(Layout.name(r) for r in killed)} after {timeout:g} s" if killed else ""
        raise ClusterFailed(f"OD-MoE cluster failed: {reason}{extra} (logs: {out_dir}/rank*.log)")
    path = out_dir / "requests.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---- command line -----------------------------------------------------------------------------
def compose_config(overrides: list[str]):
    """The Hydra config of a cluster run: ``overrides`` with ``system`` defaulting to ``odmoe``."""
    from hydra import compose, initialize_config_dir

    from odmoe.schema import compose_error

    if not any(o.split("=", 1)[0].lstrip("+") == "system" for o in overrides):
        overrides = [*overrides, "+system=odmoe"]
    overrides = [("+" + o if o.startswith("system=") else o) for o in overrides]
    with initialize_config_dir(str(repo_root() / "conf"), version_base="1.3"):
        try:
            return compose("config", overrides)
        except Exception as e:  # noqa: BLE001 - Hydra's composition errors, as one line
            raise compose_error(e) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m odmoe.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", help="a run spec written by the spawner (otherwise: Hydra overrides)")
    parser.add_argument("--out", help="directory for the main node's results")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=1)
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. hardware=cpu-emulated system.workers=4"
    )
    args = parser.parse_args(argv)
    try:  # a machine that never joined: say so before loading anything (once per machine)
        check_machines_joined()
    except OdmoeError as e:
        _bad_input(e)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if args.spec:
        spec = json.loads(Path(args.spec).read_text())
    else:
        try:
            from transformers import AutoTokenizer

            from odmoe.data.prompts import load_prompts
            from odmoe.schema import validate

            cfg = compose_config(args.overrides)
            validate(cfg)
            spec = spec_from_cfg(cfg, cfg.system, [])
            check_world(layout_for(spec))  # before any prompt is read: every rank fails at once
            tok = AutoTokenizer.from_pretrained(spec["model"]["path"], local_files_only=True)
            prompts = load_prompts(cfg.data, tok, args.prompt_len, args.num_prompts)
            spec["jobs"] = [
                {"id": p.id, "prompt": list(p.token_ids), "output_len": args.output_len} for p in prompts
            ]
        except OdmoeError as e:
            _bad_input(e)
    run_rank(spec, out)


if __name__ == "__main__":
    main()
