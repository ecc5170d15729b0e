"""One node's accelerator: its memory, its host-to-device link and its network interface.

Two implementations share one interface, so the runtime never asks which one it runs on:

* :class:`CudaDevice`: real device memory; peak bytes from ``torch.cuda.max_memory_allocated``;
  host expert stores in pinned memory; loads are ``copy_(non_blocking=True)`` on a side stream
  (one copy engine, FIFO), awaited through a CUDA event.
* :class:`EmulatedDevice` (CPU): tensors live in host memory, and the device is an explicit
  model of one, configured by a hardware profile:

  - memory: a byte-exact :class:`Ledger` of everything the node holds *as if* on the device
    (weights, expert slots, KV cache, activations, each entry the ``nbytes`` of real tensors or of
    shapes the node computes on); exceeding ``profile.<role>.memory`` is an error, like an OOM.
  - link: :meth:`EmulatedDevice.load` really copies the expert into its preallocated slot, then
    waits until ``bytes / h2d_bandwidth + h2d_latency`` has passed since the copy could start
    (one link per node, FIFO, so a second load queues behind the first). The wait is a real
    deadline, so whatever the node does meanwhile overlaps the load as it would on a GPU.
  - network: :class:`Nic` prices each outgoing message as
    ``depart = max(now, nic free)``, ``arrive = depart + bytes / net_bandwidth + net_latency``;
    the receiver does not use a message before ``arrive`` (it also cannot before it really came,
    so the real local transport time counts whenever it is longer).

Compute is never emulated: the CPU computes for real, and the profile's link and network numbers
are scaled to it (``conf/hardware/cpu-emulated.yaml`` says how).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from odmoe.errors import OdmoeError
from odmoe.hardware import HardwareProfile


def now() -> float:
    """Wall-clock seconds; comparable across the processes of one machine (messages carry it)."""
    return time.time()


def sleep_until(deadline: float) -> None:
    while (left := deadline - now()) > 0:
        time.sleep(left)


# ---- memory -----------------------------------------------------------------------------------
class Ledger:
    """Named byte entries resident on a device; tracks the total's peak and each category's peak.

    Entry names are ``category/detail`` (``weights/non_expert``, ``slots/0``, ``kv``,
    ``activations``); ``set`` replaces an entry, so a growing KV cache is one entry updated per step.
    """

    def __init__(self, capacity: float | None = None, owner: str = "device"):
        self.capacity = capacity
        self.owner = owner
        self.entries: dict[str, int] = {}
        self.total = 0
        self.peak = 0
        self.peak_entries: dict[str, int] = {}
        self._lock = threading.Lock()

    def set(self, name: str, nbytes: int) -> None:
        with self._lock:
            self.total += int(nbytes) - self.entries.get(name, 0)
            if nbytes:
                self.entries[name] = int(nbytes)
            else:
                self.entries.pop(name, None)
            if self.total > self.peak:
                self.peak = self.total
                self.peak_entries = dict(self.entries)
            if self.capacity is not None and self.total > self.capacity:
                raise OdmoeError(
                    f"{self.owner}: {self.total:,} bytes needed on a device of {self.capacity:,.0f} bytes "
                    f"({self.by_category(self.entries)}); use a profile with more device memory"
                )

    def free(self, name: str) -> None:
        self.set(name, 0)

    @staticmethod
    def by_category(entries: dict[str, int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, b in entries.items():
            cat = name.split("/", 1)[0]
            out[cat] = out.get(cat, 0) + b
        return out

    def peak_by_category(self) -> dict[str, int]:
        return self.by_category(self.peak_entries)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.total
            self.peak_entries = dict(self.entries)


# ---- network ----------------------------------------------------------------------------------
class Nic:
    """One node's outgoing network interface: serialization at ``bandwidth`` plus a one-way latency.

    With ``bandwidth`` and ``latency`` None (a real, non-emulated profile) messages arrive when
    they arrive: ``arrival`` returns 0.
    """

    HEADER_BYTES = 64  # what a message costs beyond its payload

    def __init__(self, bandwidth: float | None, latency: float | None):
        self.bandwidth = bandwidth
        self.latency = latency or 0.0
        self.free_at = 0.0
        self._lock = threading.Lock()

    @property
    def emulated(self) -> bool:
        return self.bandwidth is not None

    def arrival(self, nbytes: int) -> float:
        if not self.emulated:
            return 0.0
        with self._lock:
            depart = max(now(), self.free_at)
            self.free_at = depart + (nbytes + self.HEADER_BYTES) / self.bandwidth
            return self.free_at + self.latency


# ---- loads ------------------------------------------------------------------------------------
@dataclass
class Load:
    """One host-to-device copy in flight. ``start``/``done`` are wall-clock times."""

    slot: int
    nbytes: int
    issued: float = field(default_factory=now)
    start: float = 0.0
    done: float = 0.0
    ready: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float | None = None) -> bool:
        return self.ready.wait(timeout)


class Device:
    """What every node uses: a ledger, a NIC, expert slots and loads into them.

    ``slot(i)`` is a flat buffer big enough for one expert; :meth:`load` copies a host expert
    (flat) into it asynchronously on the node's single copy engine and returns a :class:`Load`;
    ``on_done`` (if given) runs on the copy thread once the load is complete.
    """

    emulated = False

    def __init__(self, profile: HardwareProfile, role: str, torch_device: torch.device):
        self.profile = profile
        self.role = role
        self.torch_device = torch_device
        dev = getattr(profile, role, None)
        memory = getattr(dev, "memory", None)
        # a node with several devices (the paper's shadow: two RTX 3090s) pools their memory
        capacity = memory * getattr(dev, "count", 1) if self.emulated and memory else None
        self.ledger = Ledger(capacity, owner=f"{role} device")
        self.nic = Nic(profile.net_bandwidth, profile.net_latency) if self.emulated else Nic(None, None)
        self.slots: list[torch.Tensor] = []
        self.bytes_loaded = 0
        self.loads = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self.on_done = None

    # ---- slots and loads -------------------------------------------------------------------
    def alloc_slots(self, count: int, numel: int, dtype: torch.dtype) -> None:
        self.slots = [torch.empty(numel, dtype=dtype, device=self.torch_device) for _ in range(count)]
        for i, s in enumerate(self.slots):
            self.ledger.set(f"slots/{i}", s.numel() * s.element_size())

    def host_store(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of ``tensor`` the link can load from (pinned on CUDA)."""
        return tensor.detach().to("cpu", copy=True).contiguous()

    def load(self, slot: int, host: torch.Tensor) -> Load:
        if self._thread is None:
            self._thread = threading.Thread(target=self._copy_engine, name=f"{self.role}-copy", daemon=True)
            self._thread.start()
        job = Load(slot, host.numel() * host.element_size())
        self._queue.put((job, host))
        return job

    def _copy_engine(self) -> None:
        while True:
            job, host = self._queue.get()
            self._copy(job, host)
            self.bytes_loaded += job.nbytes
            self.loads += 1
            job.ready.set()
            if self.on_done is not None:
                self.on_done(job)

    def _copy(self, job: Load, host: torch.Tensor) -> None:
        raise NotImplementedError

    # ---- memory ----------------------------------------------------------------------------
    def peak_bytes(self) -> int:
        return self.ledger.peak

    def reset_peak(self) -> None:
        self.ledger.reset_peak()

    def describe(self) -> dict:
        return {"emulated": self.emulated, "device": str(self.torch_device), "profile": self.profile.name}


class EmulatedDevice(Device):
    """A CPU standing in for a GPU: ledger memory, a deadline-timed link, an emulated NIC."""

    emulated = True

    def __init__(self, profile: HardwareProfile, role: str):
        profile.need("h2d_bandwidth", "net_bandwidth", "net_latency")
        super().__init__(profile, role, torch.device("cpu"))
        self.link_free_at = 0.0

    def _copy(self, job: Load, host: torch.Tensor) -> None:
        bw, lat = self.profile.h2d_bandwidth, self.profile.h2d_latency or 0.0
        job.start = max(now(), self.link_free_at)
        sleep_until(job.start)
        self.slots[job.slot][: host.numel()].copy_(host)
        job.done = job.start + job.nbytes / bw + lat
        self.link_free_at = job.done
        sleep_until(job.done)


class CudaDevice(Device):
    """A real GPU: allocator statistics for memory, a side stream for loads."""

    def __init__(self, profile: HardwareProfile, role: str, torch_device: torch.device):
        super().__init__(profile, role, torch_device)
        torch.cuda.set_device(torch_device)
        torch.cuda.reset_peak_memory_stats(torch_device)
        self.stream = torch.cuda.Stream(torch_device)

    def host_store(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to("cpu", copy=True).contiguous().pin_memory()

    def _copy(self, job: Load, host: torch.Tensor) -> None:
        job.start = now()
        with torch.cuda.stream(self.stream):
            self.slots[job.slot][: host.numel()].copy_(host, non_blocking=True)
        self.stream.synchronize()
        job.done = now()

    def peak_bytes(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.torch_device))

    def reset_peak(self) -> None:
        super().reset_peak()
        torch.cuda.reset_peak_memory_stats(self.torch_device)


def make_device(profile: HardwareProfile, role: str, torch_device: torch.device) -> Device:
    """The device of a node: emulated when the profile says so (CPU only), else the real one."""
    if profile.emulated:
        if torch_device.type != "cpu":
            raise OdmoeError(
                f"hardware profile {profile.name} is emulated, which runs on CPU; pass device=cpu or pick a real profile"
            )
        return EmulatedDevice(profile, role)
    if torch_device.type == "cuda":
        return CudaDevice(profile, role, torch_device)
    return HostDevice(profile, role, torch_device)


class HostDevice(Device):
    """The CPU as it is (profile ``host``): no emulated delays, the ledger still counts bytes."""

    def _copy(self, job: Load, host: torch.Tensor) -> None:
        job.start = now()
        self.slots[job.slot][: host.numel()].copy_(host)
        job.done = now()
