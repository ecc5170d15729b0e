"""Clock and host->device link of the offload engine: real CUDA copies, or an explicit CPU emulation.

Why a clock of its own: on CPU there is no device, so loads are *emulated* — a load issued at ``t``
completes at ``max(t, link free) + latency + bytes / bandwidth`` (one FIFO link, like one CUDA copy
stream) and using an expert before that deadline stalls the computation until then. The stall is
added to the clock instead of slept, so emulated runs cost only their real compute time. Compute
itself is real, measured as this process's CPU time (``time.process_time``; see :class:`Clock`). On
CUDA the copies are real (a side stream, events), the clock is ``time.perf_counter`` and stalls are
the host time spent waiting on a copy's event.

Why not the runtime's ``odmoe/device.py``, which emulates the same profile fields (``h2d_bandwidth``,
``h2d_latency``): it emulates for a *multi-process* system on a shared wall clock, so its loads are
real copies on a copy thread followed by real sleeps until the deadline, and the runtime's ranks read
``time.time``. The baselines are a *single process*: nothing else runs while a load is pending, so
sleeping would only add idle time, and charging the stall to this virtual clock gives the same
result while letting compute be timed as CPU time (``Clock``), which other jobs on shared cores do
not inflate. The price: the engine's rows and the runtime's are on different clocks (column ``clock``
of ``+exp=e2e``'s ``table2.csv``); each is compared with the fully cached model measured on
its own clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from odmoe.errors import OdmoeError
from odmoe.hardware import HardwareProfile


@dataclass
class Clock:
    """Engine time = measured compute time + accounted stalls + charged extra compute (``add``).

    ``timer`` is ``time.perf_counter`` on CUDA (wall time). On the emulated device it is
    ``time.process_time``, the CPU time of this process: run with one torch thread, it equals wall
    time on an idle machine and, unlike wall time, is not inflated by other jobs sharing the cores.
    """

    timer: Callable[[], float] = time.perf_counter
    t0: float | None = None
    offset: float = 0.0
    stall: float = 0.0
    real_stall: float = 0.0  # the part of ``stall`` that passed on ``timer`` (CUDA waits)

    def __post_init__(self) -> None:
        if self.t0 is None:
            self.t0 = self.timer()

    def now(self) -> float:
        return self.timer() - self.t0 + self.offset

    def compute(self) -> float:
        """Compute time so far: the timer's time minus the stalls it saw (the replay's input)."""
        return self.timer() - self.t0 - self.real_stall

    def wait_until(self, deadline: float) -> float:
        """Stall until ``deadline`` (emulated): returns the stall added."""
        gap = deadline - self.now()
        if gap > 0:
            self.offset += gap
            self.stall += gap
            return gap
        return 0.0

    def add(self, seconds: float) -> None:
        """Charge extra emulated compute time (e.g. a slower host for CPU-only)."""
        self.offset += seconds


@dataclass
class Ledger:
    """Device-resident bytes and their peak: weights, expert cache (in-flight copies included), KV cache."""

    fixed: int = 0
    experts: int = 0
    kv: int = 0
    peak: int = 0

    def update(self) -> None:
        self.peak = max(self.peak, self.fixed + self.experts + self.kv)


class EmulatedLink:
    """One FIFO host->device link with the profile's bandwidth and latency; copies are not performed."""

    emulated = True

    def __init__(self, bandwidth: float, latency: float = 0.0):
        if bandwidth <= 0:
            raise OdmoeError(f"link bandwidth must be positive, got {bandwidth}")
        self.bandwidth = float(bandwidth)
        self.latency = float(latency)
        self.free_at = 0.0
        self.bytes_moved = 0
        self.busy = 0.0

    def reset(self) -> None:
        self.free_at = 0.0

    def transfer(self, nbytes: int, at: float) -> float:
        """Queue ``nbytes`` at emulated time ``at``; returns the completion deadline."""
        start = max(at, self.free_at)
        seconds = self.latency + nbytes / self.bandwidth
        self.free_at = start + seconds
        self.bytes_moved += nbytes
        self.busy += seconds
        return self.free_at

    def copy(self, tensors: tuple[torch.Tensor, ...], nbytes: int, clock: Clock):
        """Issue a load; the 'device copy' is the host tensor itself (the ledger counts its bytes)."""
        return tensors, self.transfer(nbytes, clock.now())

    def wait(self, handle: float, clock: Clock) -> float:
        return clock.wait_until(handle)


class CudaLink:
    """Real host->device copies on a side stream; the compute stream waits on each copy's event."""

    emulated = False

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.bytes_moved = 0
        self.busy = 0.0

    def reset(self) -> None:
        pass

    def transfer(self, nbytes: int, at: float) -> float:
        """Write-back traffic (D2H) is real on CUDA only when data is copied; here it is just counted."""
        self.bytes_moved += nbytes
        return at

    def copy(self, tensors: tuple[torch.Tensor, ...], nbytes: int, clock: Clock):
        with torch.cuda.stream(self.stream):
            out = tuple(t.to(self.device, non_blocking=True) for t in tensors)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.bytes_moved += nbytes
        return out, event

    def wait(self, handle, clock: Clock) -> float:
        if handle.query():
            torch.cuda.current_stream(self.device).wait_event(handle)
            return 0.0
        t = time.perf_counter()
        handle.synchronize()
        torch.cuda.current_stream(self.device).wait_event(handle)
        gap = time.perf_counter() - t
        clock.stall += gap
        clock.real_stall += gap
        return gap


def make_link(hardware: HardwareProfile, device: torch.device):
    """The link the engine loads over: real CUDA copies on a GPU, the profile's emulated link on CPU."""
    if device.type == "cuda":
        return CudaLink(device)
    hardware.need("h2d_bandwidth")
    return EmulatedLink(hardware.h2d_bandwidth, hardware.h2d_latency or 0.0)
