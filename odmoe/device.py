"""One node's accelerator: its memory, its host-to-device link and its network interface.

Two kinds share one interface, so the runtime never asks which one it runs on:

* real devices (``timing=wall``): :class:`CudaDevice` has real device memory (peak bytes from
  ``torch.cuda.max_memory_allocated``), host expert stores in pinned memory and loads as
  ``copy_(non_blocking=True)`` on a side stream (one copy engine, FIFO), awaited through a CUDA event;
  :class:`HostDevice` is the CPU as it is. Loads run on a copy thread and are awaited for real.
* :class:`EmulatedDevice` (``timing=measured`` or ``modelled``): tensors live in host memory and the device
  is an explicit model of one, configured by a hardware profile:

  - memory: a byte-exact :class:`Ledger` of everything the node holds *as if* on the device (weights,
    expert slots, KV cache, activations); exceeding ``profile.<role>.memory`` is an error, like an OOM;
  - link: :meth:`EmulatedDevice.load` copies the expert into its slot at once (the clock paused: the host's
    memcpy is not the emulated system's time) and returns the copy's completion time on the node's
    :class:`~odmoe.costs.Link` in virtual time (one copy engine, FIFO);
  - network: two NIC links (the virtual timeline and the zero-stall bound's) price each outgoing message.

Nothing sleeps: waiting is the clock's ``V = max(V, t)`` (``odmoe/clock.py``).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from odmoe.clock import Clock
from odmoe.costs import Link
from odmoe.errors import OdmoeError
from odmoe.hardware import HardwareProfile


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


# ---- loads ------------------------------------------------------------------------------------
@dataclass
class Load:
    """One host-to-device copy. ``done`` is its completion on the node's clock (virtual on an emulated
    device, ``time.perf_counter`` on a real one)."""

    slot: int
    nbytes: int
    start: float = 0.0
    done: float = 0.0
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None  # what ended the copy, when it failed

    def wait(self, timeout: float | None = None) -> bool:
        """True once the copy finished, False after ``timeout`` s; a failed copy raises its exception."""
        finished = self.ready.wait(timeout)
        if self.error is not None:
            raise self.error
        return finished


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
        capacity = memory * getattr(dev, "count", 1) if memory else None
        self.ledger = Ledger(capacity, owner=f"{role} device")
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

    def load(self, slot: int, host: torch.Tensor, at: float = 0.0) -> Load:
        """Copy ``host`` into ``slot``; ``at`` is the issue time on an emulated device's clock."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._copy_engine, name=f"{self.role}-copy", daemon=True)
            self._thread.start()
        job = Load(slot, host.numel() * host.element_size())
        self._queue.put((job, host))
        return job

    def _copy_engine(self) -> None:
        """Serve loads in order. A copy that raises fails its load and every later one with that exception:
        whoever waits for them gets it at once instead of a timeout."""
        failure: BaseException | None = None
        while True:
            job, host = self._queue.get()
            if failure is None:
                try:
                    self._copy(job, host)
                    self.bytes_loaded += job.nbytes
                    self.loads += 1
                except BaseException as e:  # noqa: BLE001 - handed to whoever waits for this load
                    failure = e
            job.error = failure
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
    """A CPU standing in for a GPU: ledger memory, a virtual-time copy link, virtual-time NICs.

    ``nbytes`` prices every load (``timing=modelled`` at another model's shape: that model's expert bytes);
    by default a load costs the bytes really copied.
    """

    emulated = True

    def __init__(self, profile: HardwareProfile, role: str, clock: Clock, nbytes: float | None = None):
        super().__init__(profile, role, torch.device("cpu"))
        self.clock = clock
        self.link = Link.h2d(profile)
        self.nic, self.nic_bound = Link.nic(profile), Link.nic(profile)
        # the inbound side of the switch port (used by the main node, whose port every worker sends to)
        self.port, self.port_bound = Link.nic(profile), Link.nic(profile)
        self.priced_bytes = nbytes

    def load(self, slot: int, host: torch.Tensor, at: float = 0.0) -> Load:
        job = Load(slot, host.numel() * host.element_size(), start=max(at, self.link.free_at))
        with self.clock.paused():
            self.slots[slot][: host.numel()].copy_(host)
        job.done = self.link.transfer(self.priced_bytes or job.nbytes, at)
        self.bytes_loaded += job.nbytes
        self.loads += 1
        job.ready.set()
        return job


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
        # The copy thread has its own current device (CUDA's is per thread): name it, for nodes on cuda:1..
        torch.cuda.set_device(self.torch_device)
        job.start = time.perf_counter()
        with torch.cuda.stream(self.stream):
            # A slot is reused once its expert has computed: the copy must not overwrite it while kernels
            # queued on the compute (default) stream may still read it.
            self.stream.wait_stream(torch.cuda.default_stream(self.torch_device))
            self.slots[job.slot][: host.numel()].copy_(host, non_blocking=True)
        self.stream.synchronize()
        job.done = time.perf_counter()

    def peak_bytes(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.torch_device))

    def reset_peak(self) -> None:
        super().reset_peak()
        torch.cuda.reset_peak_memory_stats(self.torch_device)


def make_device(
    profile: HardwareProfile,
    role: str,
    torch_device: torch.device,
    clock: Clock,
    load_bytes: float | None = None,
) -> Device:
    """The device of a node: emulated on a virtual clock (CPU only), else the real one."""
    if clock.virtual:
        if torch_device.type != "cpu":
            raise OdmoeError(
                f"timing={clock.mode} emulates the devices of profile {profile.name} on the CPU; "
                "pass device=cpu, or timing=wall for a real GPU"
            )
        return EmulatedDevice(profile, role, clock, load_bytes)
    if torch_device.type == "cuda":
        return CudaDevice(profile, role, torch_device)
    return HostDevice(profile, role, torch_device)


class HostDevice(Device):
    """The CPU as it is (profile ``host``): no emulated delays, the ledger still counts bytes."""

    def _copy(self, job: Load, host: torch.Tensor) -> None:
        job.start = time.perf_counter()
        self.slots[job.slot][: host.numel()].copy_(host)
        job.done = time.perf_counter()
