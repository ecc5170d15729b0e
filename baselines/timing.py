"""The offload engine's host->device link: real CUDA copies under ``timing=wall``, the shared
:class:`odmoe.costs.Link` model in virtual time otherwise.

On an emulated profile a load issued at virtual time ``t`` completes at ``max(t, link free) + h2d_latency +
bytes / h2d_bandwidth`` (one FIFO copy engine); using the expert earlier is a stall, charged to the engine's
clock (``odmoe/clock.py``) as ``V = max(V, done)``. Nothing is copied: the device copy is the host tensor
itself (the ledger counts its bytes). On CUDA the copies are real (a side stream, events) and a stall is the
time the GPU's compute stream waited on a copy's event, read from CUDA timing events.
"""

from __future__ import annotations

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


class CudaCopy:
    """One expert's copy on the side stream: the device tensors and the event that marks them complete."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], event: torch.cuda.Event):
        self.tensors, self.event = tensors, event


class CudaLink:
    """Real host->device copies on a side stream; the compute stream waits on each copy's event.

    Stalls come from CUDA events, not host timers: :meth:`wait` records a timing event on the compute stream
    just before it waits for the copy and one just after, so the time between them is how long the GPU's
    compute stream sat idle on that copy (the host may be far ahead of the GPU, so host waiting time would
    not be a stall). The pairs are read once the step has synchronized (:meth:`settle`), adding to the
    clock's ``stall``.
    """

    emulated = False

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.bytes_moved = 0
        self.busy = 0.0
        self.free_at = 0.0
        self._waits: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def reset(self, at: float = 0.0) -> None:
        self._waits.clear()

    def transfer(self, nbytes: float, at: float) -> float:
        """Write-back traffic (D2H) is counted, not copied (the engine never reads an evicted copy back)."""
        self.bytes_moved += int(nbytes)
        return at

    def copy(self, tensors: tuple[torch.Tensor, ...], nbytes: float, clock: Clock):
        """Issue the copy of ``tensors`` (pinned host memory); returns (device tensors, handle)."""
        with torch.cuda.stream(self.stream):
            out = tuple(t.to(self.device, non_blocking=True) for t in tensors)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.bytes_moved += int(nbytes)
        return out, CudaCopy(out, event)

    def wait(self, handle: CudaCopy, clock: Clock) -> float:
        """Make the compute stream wait for the copy, bracketed by timing events (read by :meth:`settle`)."""
        compute = torch.cuda.current_stream(self.device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(compute)
        compute.wait_event(handle.event)
        after.record(compute)
        self._waits.append((before, after))
        # the tensors were allocated on the copy stream and are used on the compute stream: the caching
        # allocator must not hand their memory out again before the compute stream is done with them
        for t in handle.tensors:
            t.record_stream(compute)
        return 0.0

    def settle(self, clock: Clock) -> float:
        """Add the compute stream's waits on copies since the last call to ``clock.stall`` (call after the
        step has synchronized); returns the seconds added."""
        stalled = sum(b.elapsed_time(a) for b, a in self._waits) / 1e3
        self._waits.clear()
        clock.stall += stalled
        return stalled


def make_link(hardware: HardwareProfile, device: torch.device, clock: Clock):
    """Real CUDA copies under ``timing=wall`` on a GPU; the profile's link in virtual time otherwise."""
    if not clock.virtual:
        return CudaLink(device)
    hardware.need("h2d_bandwidth")
    return VirtualLink(hardware.h2d_bandwidth, setup=hardware.h2d_latency or 0.0)
