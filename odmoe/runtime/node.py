"""What every rank of an OD-MoE cluster shares: its spec, layout, device, messages and failure handling.

A rank fails *loudly and once*: the first rank that sees a problem (an exception, a broken connection to
a peer, a wait longer than ``system.timeout_s``) publishes one line naming the rank at fault in the
rendezvous store and exits (a rank whose heartbeat in the store has stopped is blamed for a timeout ahead
of the peer that was being waited on, so a stopped worker is named, not the main node that waits for it;
a rank whose wait times out gives the heartbeats a few seconds to go stale first); a watchdog thread in
every other rank polls that key (every 0.5 s) and exits with the same line, so the whole cluster is gone
within the timeout plus about five seconds. A rank that is killed outright is noticed by every rank that
receives from it (its connection breaks); one that hangs, by the rank waiting on it (the wait times out).
A rank blamed for a timeout because it is stopped (state T in ``/proc``, for a rank on the same machine)
or its heartbeat stopped (a SIGSTOPped or wedged process cannot end itself) is killed by the rank that
blames it when both run on the same machine (each rank publishes its host and pid), so under torchrun it
does not linger until the agent's own grace period runs out.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from odmoe.clock import Clock, Timing
from odmoe.costs import Formats, ModelCosts, Pricer, run_costs
from odmoe.device import Device, make_device
from odmoe.hardware import HardwareProfile, profile_from_config
from odmoe.runtime.layout import MAIN, SHADOW, Layout
from odmoe.runtime.messages import Comm

JOB_STRIDE = 1 << 20  # message iteration numbers are job * JOB_STRIDE + n, so requests never mix


def tick(job: int, n: int) -> int:
    return job * JOB_STRIDE + n


@dataclass
class Node:
    """One rank's context. ``spec`` is the plain dict the launcher built (see ``odmoe.launch``)."""

    spec: dict[str, Any]
    rank: int
    layout: Layout
    profile: HardwareProfile
    torch_device: torch.device
    device: Device
    comm: Comm
    store: Any
    out_dir: Path | None
    timeout: float
    run_id: str
    clock: Clock
    costs: ModelCosts | None  # timing=modelled: the cost model that prices compute and bytes
    stats: dict[str, Any] = field(default_factory=dict)
    _heard: dict[int, tuple[bytes, float]] = field(
        default_factory=dict, repr=False
    )  # rank -> (beat, seen at)

    def pricer(self, num_layers: int, kind: str) -> Pricer | None:
        """Charges modelled compute per layer (None unless ``timing=modelled``)."""
        return None if self.costs is None else Pricer(self.costs, num_layers, kind)

    @property
    def name(self) -> str:
        return Layout.name(self.rank)

    @property
    def system(self) -> dict[str, Any]:
        return self.spec["system"]

    def key(self, name: str) -> str:
        return f"odmoe/{self.run_id}/{name}"

    # ---- failure ---------------------------------------------------------------------------
    def fail(self, error: BaseException | str) -> None:
        """Publish this rank's failure (unless another rank's came first), print one line, exit."""
        if os.environ.get("ODMOE_DEBUG") and isinstance(
            error, BaseException
        ):  # the whole story, for developers
            import traceback

            traceback.print_exception(error, file=sys.stderr)
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if isinstance(error, BaseException) and type(error).__name__ in (
            "PeerLost",
            "TimeoutError",
            "OdmoeError",
        ):
            text = str(error)
        if isinstance(error, TimeoutError):  # a wait timed out: blame a rank that stopped running, if any
            stale = self.stopped_local_rank() or self.await_stale_rank()
            if stale is not None:
                text = (
                    f"{Layout.name(stale[0])} stopped responding (no heartbeat for {stale[1]:.1f} s; {text})"
                )
                self.kill_if_local(stale[0])
        mine = f"{self.name}: {text}"
        try:
            first = self.store.compare_set(self.key("abort"), "", mine).decode()
        except Exception:
            first = mine
        _write_failure(self.out_dir, first)
        line = mine if first == mine else f"{self.name}: stopping because {first}"
        print(f"odmoe: {line}", file=sys.stderr, flush=True)
        os._exit(1)

    def local_pid(self, rank: int) -> int | None:
        """The pid ``rank`` published, if it runs on this machine (None: another machine, or not published)."""
        try:
            host, text = self.store.get(self.key(f"pid/{rank}")).decode().split()
            pid = int(text)
        except Exception:  # noqa: BLE001 - best effort: the rank may not have published, or the store is gone
            return None
        return pid if host == socket.gethostname() and pid != os.getpid() else None

    def kill_if_local(self, rank: int) -> None:
        """SIGKILL ``rank`` if it runs on this machine (a stopped process ignores everything else)."""
        pid = self.local_pid(rank)
        try:
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        except OSError:  # the rank is already gone
            pass

    HEARTBEAT_S = 1.0
    POLL_S = 0.5  # how often the watchdog looks for another rank's failure
    STALE_S = 2.5  # a heartbeat counter that has not moved for this long (observer's clock) is stale

    def stale_rank(self) -> tuple[int, float] | None:
        """The rank whose heartbeat counter has gone longest without moving, if that is over ``STALE_S``.

        Heartbeats are counters, not timestamps, and their age is measured on this rank's own monotonic
        clock (when this rank's watchdog last saw each counter change): a ``time.time()`` written on one
        machine and compared with another machine's would measure the clocks' offset, not the heartbeat's
        age (docs/runtime.md, "Clocks across machines").
        """
        now = time.monotonic()
        ages = {r: now - changed for r, (_, changed) in dict(self._heard).items()}
        if not ages:
            return None
        rank = max(ages, key=ages.get)
        return (rank, ages[rank]) if ages[rank] > self.STALE_S else None

    def stopped_local_rank(self) -> tuple[int, float] | None:
        """A rank on this machine whose process is stopped (state ``T``: SIGSTOP, a debugger), if any.

        Read from ``/proc`` rather than inferred from heartbeats, so it does not depend on how long the
        counter has stood still when this rank's wait times out; the heartbeats remain the test for ranks
        on other machines. Returns the rank and how long its counter has stood still (0 if never seen).
        """
        for rank in range(self.layout.world_size):
            pid = self.local_pid(rank)  # None for this rank itself
            if pid is not None and process_stopped(pid):
                seen = self._heard.get(rank)
                return rank, (time.monotonic() - seen[1]) if seen else 0.0
        return None

    def await_stale_rank(self) -> tuple[int, float] | None:
        """``stale_rank``, waiting up to ``STALE_S + HEARTBEAT_S`` for one to appear.

        A wait can time out before the rank that caused it looks stale: the shadow, which runs ahead,
        starts waiting on the main node before a worker is stopped, so when its wait times out the
        worker's counter may have stood still for less than ``STALE_S``. Waiting a little longer names
        the stopped rank instead of the live one that was waiting on it; the wait ends early once another
        rank has published its failure (this rank's watchdog then exits with that line).
        """
        deadline = time.monotonic() + self.STALE_S + self.HEARTBEAT_S
        while (stale := self.stale_rank()) is None and time.monotonic() < deadline:
            time.sleep(self.POLL_S)
            try:
                self._listen()
            except Exception:  # noqa: BLE001 - the store is gone: blame the peer that was waited on
                return None
        return stale

    def _listen(self) -> None:
        """Note the local time at which each other rank's heartbeat counter last changed."""
        keys = {r: self.key(f"hb/{r}") for r in range(self.layout.world_size) if r != self.rank}
        present = [r for r in keys if r in self._heard or self.store.check([keys[r]])]
        if not present:
            return
        values = self.store.multi_get([keys[r] for r in present])
        now = time.monotonic()
        for r, value in zip(present, values, strict=True):
            if r not in self._heard or self._heard[r][0] != value:
                self._heard[r] = (value, now)

    def start_watchdog(self) -> None:
        self.store.set(self.key(f"pid/{self.rank}"), f"{socket.gethostname()} {os.getpid()}")

        def watch() -> None:
            key = self.key("abort")
            beats, beat = 0, 0.0
            while True:
                time.sleep(self.POLL_S)
                try:
                    if time.monotonic() - beat >= self.HEARTBEAT_S:
                        beat, beats = time.monotonic(), beats + 1
                        self.store.set(self.key(f"hb/{self.rank}"), str(beats))
                        self._listen()
                    if self.store.check([key]):
                        first = self.store.get(key).decode()
                        print(f"odmoe: {self.name}: stopping because {first}", file=sys.stderr, flush=True)
                        os._exit(1)
                except Exception as e:  # the store is gone: its host (torchrun agent or spawner) died
                    if self.comm.stopping:
                        return
                    print(
                        f"odmoe: {self.name}: stopping because the rendezvous store is unreachable ({e})",
                        file=sys.stderr,
                        flush=True,
                    )
                    os._exit(1)

        threading.Thread(target=watch, name="watchdog", daemon=True).start()

    def barrier(self, name: str, timeout: float) -> None:
        """All ranks reach ``name`` (store counter), or fail naming how many did not."""
        key = self.key(f"barrier/{name}")
        self.store.add(key, 1)
        deadline = time.monotonic() + timeout
        world = self.layout.world_size
        while (count := self.store.add(key, 0)) < world:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {count} of {world} ranks reached '{name}' within {timeout:g} s")
            time.sleep(0.05)


def process_stopped(pid: int) -> bool:
    """Whether process ``pid`` on this machine is stopped (SIGSTOP, a debugger: state T): it cannot end
    itself, so whoever notices kills it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _write_failure(out_dir: Path | None, text: str) -> None:
    if out_dir is None:
        return
    try:
        fd = os.open(out_dir / "failure.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
    except OSError:
        pass


def peers(rank: int, layout: Layout) -> list[int]:
    """Ranks this rank receives messages from."""
    workers = [Layout.worker_rank(w) for w in range(layout.num_workers)]
    if rank == MAIN:
        return [SHADOW, *workers]
    if rank == SHADOW:
        return [MAIN]
    return [MAIN, SHADOW]


def pick_torch_device(spec_device: str, local_rank: int) -> torch.device:
    if spec_device == "cuda" or (spec_device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def connect(spec: dict[str, Any], layout: Layout, out_dir: Path | None) -> Node:
    """Join the process group (torchrun-style environment) and build this rank's context.

    Before the process group exists, every process publishes its place (machine, local rank) in the
    rendezvous store and the ranks are renumbered in that order (:func:`odmoe.runtime.net.layout_rank`), gloo
    is pointed at the cluster network (:func:`odmoe.runtime.net.choose_gloo_interface`), and a process count
    that does not fit the layout (a machine that never joined) is refused with one line naming the machines
    that did join."""
    from odmoe.errors import OdmoeError
    from odmoe.runtime import net

    launched_rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    machines = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    startup = float(spec["system"].get("startup_timeout_s", 600))
    run_id = spec.get("run_id") or "{}-{}".format(
        os.environ.get("TORCHELASTIC_RUN_ID", "run"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    )
    host, port = net.store_address()
    if not os.environ.get("ODMOE_STORE"):
        net.check_master_addr(host, machines)
    net.choose_gloo_interface(host)
    store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=startup))
    place = net.place_from_env()
    rank, places = net.layout_rank(store, f"odmoe/{run_id}/place", launched_rank, place, world, startup)
    if world != layout.world_size:
        nodes = sorted({node for node, _ in places})
        joined = (
            f" on machines {', '.join(map(str, nodes))} (a machine that never joined the rendezvous is missing)"
            if machines > 1 or len(nodes) > 1
            else ""
        )
        workers = (world - 2) // layout.group_size * layout.group_size
        fits = f", or use system.workers={workers}" if workers > 0 else ""
        raise OdmoeError(
            f"{world} processes were started{joined} but the layout needs {layout.world_size} "
            f"(main + shadow + {layout.num_workers} workers); start every machine with --nproc-per-node giving "
            f"{layout.world_size} in all{fits}"
        )
    torch_device = pick_torch_device(spec.get("device", "cpu"), local_rank)
    backend = "cpu:gloo,cuda:nccl" if torch_device.type == "cuda" else "gloo"
    # The process-group timeout is long on purpose: receive threads wait for the next message for as long
    # as a run lasts; liveness is the watchdog's job (system.timeout_s). Every rank is known to be here.
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"odmoe/{run_id}/pg", store),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(days=1),
    )
    profile = profile_from_config(spec["hardware"])
    role = Layout.role(rank)
    timing = Timing(**spec["timing"])
    clock = timing.clock()
    costs = run_costs(timing, profile, _model_config(spec), formats_of(spec)) if timing.virtual else None
    load_bytes = costs.expert_bytes() if costs is not None else None
    device = make_device(profile, role, torch_device, clock, load_bytes)
    timeout = float(spec["system"].get("timeout_s", 60))
    nics = (device.nic, device.nic_bound) if device.emulated else None
    # every worker sends its expert outputs to the main node: only its inbound port is contended
    ports = (device.port, device.port_bound) if device.emulated and rank == MAIN else None
    comm = Comm(rank, peers(rank, layout), clock, nics, costs, timeout, ports)
    return Node(
        spec, rank, layout, profile, torch_device, device, comm, store, out_dir, timeout, run_id, clock, costs
    )


DTYPE_FORMATS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def formats_of(spec: dict[str, Any]) -> Formats:
    """Storage formats of a run (what modelled bytes are priced at): the main model's dtype, the workers'
    expert dtype, the shadow's precision."""
    main = DTYPE_FORMATS.get(spec["model"].get("dtype", "float32"), "fp32")
    s = spec["system"]
    shadow = s.get("shadow", {}) or {}
    precision = "fp32" if shadow.get("predictor") == "inverted" else str(shadow.get("precision", "int8"))
    return Formats(main=main, worker=str(s.get("expert_dtype", "fp32")), shadow=precision, kv=main, act=main)


def _model_config(spec: dict[str, Any]):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(spec["model"]["path"], local_files_only=True)
