"""The offload engine's host->device link: real CUDA copies under ``timing=wall``, the shared
:class:`odmoe.costs.Link` model in virtual time otherwise.

On an emulated profile a load issued at virtual time ``t`` completes at ``max(t, link free) + h2d_latency +
bytes / h2d_bandwidth`` (one FIFO copy engine); using the expert earlier is a stall, charged to the engine's
clock (``odmoe/clock.py``) as ``V = max(V, done)``. Nothing is copied: the device copy is the host tensor
itself (the ledger counts its bytes). On CUDA the copies are real (a side stream, events) and a stall is the
host time spent waiting on a copy's event.
"""

from __future__ import annotations

import time

import torch

from odmoe.clock import Clock
from odmoe.costs import Link
from odmoe.hardware import HardwareProfile


class VirtualLink(Link):
    """The profile's link in virtual time; a 'copy' hands back the host tensors and the completion time."""

    emulated = True

    def copy(self, tensors: tuple[torch.Tensor, ...], nbytes: float, clock: Clock):
        return tensors, self.transfer(nbytes, clock.now())

    def wait(self, handle: float, clock: Clock) -> float:
        return clock.wait_copy(handle)


class CudaLink:
    """Real host->device copies on a side stream; the compute stream waits on each copy's event."""

    emulated = False

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.bytes_moved = 0
        self.busy = 0.0
        self.free_at = 0.0

    def reset(self, at: float = 0.0) -> None:
        pass

    def transfer(self, nbytes: float, at: float) -> float:
        """Write-back traffic (D2H) is counted, not copied (the engine never reads an evicted copy back)."""
        self.bytes_moved += int(nbytes)
        return at

    def copy(self, tensors: tuple[torch.Tensor, ...], nbytes: float, clock: Clock):
        with torch.cuda.stream(self.stream):
            out = tuple(t.to(self.device, non_blocking=True) for t in tensors)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.bytes_moved += int(nbytes)
        return out, event

    def wait(self, handle, clock: Clock) -> float:
        if not handle.query():
            t = time.perf_counter()
            handle.synchronize()
            clock.stall += time.perf_counter() - t
        torch.cuda.current_stream(self.device).wait_event(handle)
        return 0.0


def make_link(hardware: HardwareProfile, device: torch.device, clock: Clock):
    """Real CUDA copies under ``timing=wall`` on a GPU; the profile's link in virtual time otherwise."""
    if not clock.virtual:
        return CudaLink(device)
    hardware.need("h2d_bandwidth")
    return VirtualLink(hardware.h2d_bandwidth, setup=hardware.h2d_latency or 0.0)
