"""The one clock of every executor: ``timing: wall | measured | modelled``.

Why: a timing must be a property of the system under test and the hardware profile it emulates, never of
the host it happens to run on. On an emulated profile every executor (each rank of the OD-MoE runtime, the
offload engine, the fully cached model) keeps a *virtual* clock, as trace-driven and online emulators of
distributed programs do (SimGrid's SMPI, parallel discrete-event simulation):

* compute advances it, by
  - ``measured``: the executing thread's CPU time (``time.thread_time``; one torch thread per executor)
    times the profile's ``compute_scale`` (host seconds -> target seconds), so a descheduled thread or a
    busy neighbour costs nothing; or
  - ``modelled``: the duration the cost model (``odmoe.costs.ModelCosts``) gives for that step on the
    profile's devices at a chosen model shape (``timing.shape``), charged by the executor with
    :meth:`Clock.charge`; host time is ignored, so a run gives the same times on any machine;
* transfers go through :class:`odmoe.costs.Link` FIFOs in virtual time, and waiting for a message or a copy
  is ``V = max(V, t)``. Nothing sleeps.

Beside ``V`` the clock keeps the *zero-stall bound* ``B``: the same compute and messages, but waits for
expert copies cost nothing. Messages carry both times, so ``B`` at the end of a request is a true
critical-path bound of what the same compute and hops give without a single stall.

``wall`` is real hardware (a GPU, or the host CPU as it is): ``time.perf_counter``, real copies, real
waits; ``B`` is not tracked there (clocks of different machines are never compared).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from odmoe.errors import OdmoeError

TIMINGS = ("wall", "measured", "modelled")


@dataclass(frozen=True)
class Timing:
    """The resolved ``timing`` config: the clock, the shape modelled compute is priced at, the scale."""

    mode: str
    shape: str | None = None  # modelled: a shipped shape (mixtral-8x7b, ...) or None for the run's model
    scale: float = 1.0  # measured: target seconds per host CPU second (the profile's compute_scale)

    @property
    def virtual(self) -> bool:
        return self.mode != "wall"

    def describe(self) -> dict:
        return {"clock": self.mode, "shape": self.shape, "compute_scale": self.scale}


def resolve_timing(node, profile, device: str = "cpu") -> Timing:
    """The run's timing from the ``timing`` config node (``mode: auto`` picks ``measured`` on an emulated
    profile and ``wall`` otherwise); every impossible combination is one clear error."""
    raw = dict(node or {})
    mode = str(raw.get("mode", "auto"))
    if mode == "auto":
        mode = "measured" if profile.emulated else "wall"
    if mode not in TIMINGS:
        raise OdmoeError(f"unknown timing {mode!r}; use timing=wall, timing=measured or timing=modelled")
    if mode == "wall" and profile.emulated:
        raise OdmoeError(
            f"timing=wall runs on real hardware, but hardware profile {profile.name} is emulated; "
            "use timing=measured or timing=modelled (or a real profile such as hardware=host)"
        )
    if mode != "wall" and device == "cuda":
        raise OdmoeError(
            f"timing={mode} emulates the profile's devices on the CPU; with device=cuda use timing=wall"
        )
    shape = raw.get("shape")
    if shape is not None and mode != "modelled":
        raise OdmoeError(f"timing.shape prices modelled compute; it needs timing=modelled, not {mode}")
    scale = float(getattr(profile, "compute_scale", None) or 1.0)
    return Timing(mode, None if shape is None else str(shape), scale)


class Clock:
    """One executor's time ``V`` and its zero-stall bound ``B`` (see the module docstring).

    Use from the one thread whose compute it times (``measured`` reads that thread's CPU time).
    """

    def __init__(self, mode: str = "measured", scale: float = 1.0):
        if mode not in TIMINGS:
            raise OdmoeError(f"unknown clock {mode!r}; use one of {', '.join(TIMINGS)}")
        self.mode, self.scale = mode, float(scale)
        self.t = 0.0  # V at the last sync
        self.tb = 0.0  # B at the last sync
        self.stall = 0.0  # time V spent waiting for copies
        self._host = {"measured": time.thread_time, "wall": time.perf_counter}.get(mode)
        self._mark = self._host() if self._host else 0.0
        self._paused = 0

    @property
    def virtual(self) -> bool:
        return self.mode != "wall"

    def reset(self) -> None:
        """Time 0 is now: setup (loading models, building stores) is not the system's time."""
        self.t = self.tb = self.stall = 0.0
        self._mark = self._host() if self._host else 0.0

    def _sync(self) -> None:
        if self._host is not None:
            h = self._host()
            d = 0.0 if self._paused and self.mode == "measured" else (h - self._mark) * self.scale
            self._mark = h
            self.t += d
            self.tb += d

    def now(self) -> float:
        self._sync()
        return self.t

    def bound(self) -> float:
        self._sync()
        return self.tb

    def charge(self, seconds: float) -> None:
        """Modelled compute: advance by the cost model's ``seconds`` (measured and wall time themselves)."""
        if self.mode == "modelled":
            self.t += seconds
            self.tb += seconds

    def receive(self, at: float, at_bound: float) -> None:
        """A message delivered at ``at`` (``at_bound`` on the bound's timeline) is used now."""
        if self.virtual:
            self._sync()
            self.t = max(self.t, at)
            self.tb = max(self.tb, at_bound)

    def wait_copy(self, done: float) -> float:
        """Wait for a host->device copy that completes at ``done``; returns the stall. The bound never waits."""
        self._sync()
        gap = done - self.t
        if gap > 0:
            if self.virtual:
                self.t = done
            self.stall += gap
            return gap
        return 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Host work that is not the emulated system's (instrumentation, the emulated copy's memcpy):
        measured time stands still inside (receives and waits still move the clock)."""
        self._sync()
        self._paused += 1
        try:
            yield
        finally:
            self._sync()
            self._paused -= 1
