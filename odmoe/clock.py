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

Thread CPU time does not count descheduled time, but on a shared (cloud) host the CPU itself runs the same
work at speeds that drift by tens of percent over seconds (other guests in the caches and memory; see
docs/runtime.md, "Host invariance"). The calibrated clock (the default) normalizes that away: every
``PROBE_INTERVAL`` of compute the clock times a fixed probe (:func:`probe_seconds`: a small decoder block at
batch 1, the op mix of a small model's decode step) and charges the compute since the previous
sync at ``profile.probe_seconds / probe`` host seconds per host second, i.e. at the speed the host had
when the profile's ``probe_seconds`` was measured. The probe's own time is not charged. Our choice, where
thread CPU time alone proved unrepeatable on a shared host: a correction by a neighbouring measurement of
the host's speed, as in duet benchmarking, which holds only as far as the probe slows down with the
workload; across CPU types it is approximate. On by default wherever the profile has a ``probe_seconds``
(``timing.calibrate=false``: raw thread CPU time).

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

import torch

from odmoe.errors import OdmoeError

TIMINGS = ("wall", "measured", "modelled")
DEQUANT = ("unfused", "fused")  # timing.dequant (odmoe/costs.py)
PROBE_INTERVAL = 5e-3  # host CPU seconds of compute between two probes of a calibrated measured clock


def _probe_weights(*shape: int) -> torch.Tensor:
    return torch.linspace(-0.1, 0.1, torch.Size(shape).numel()).reshape(shape)


# The probe: one pre-norm decoder block at batch 1 (hidden 96, 4 heads, 32 cached keys, gated MLP of 192),
# the op mix of a small model's decode step. Chosen over a single product (the first probe) because it
# follows the embedded model's decode speed closer across the host's drift: side by side on the 2-core
# host the decode time it corrects has a 6.6% coefficient of variation against 9.8% (docs/clock.md).
_PROBE = {
    "x": _probe_weights(1, 1, 96),
    "norm": torch.ones(96),
    "qkv": _probe_weights(288, 96),
    "k": _probe_weights(1, 4, 32, 24),
    "v": _probe_weights(1, 4, 32, 24).flip(-1),
    "o": _probe_weights(96, 96),
    "gate_up": _probe_weights(384, 96),
    "down": _probe_weights(96, 192),
}


def _probe_block() -> None:
    w, F = _PROBE, torch.nn.functional
    x = w["x"]
    q = F.linear(F.rms_norm(x, (96,), w["norm"]), w["qkv"])[..., :96].view(1, 1, 4, 24).transpose(1, 2)
    x = x + F.linear(
        F.scaled_dot_product_attention(q, w["k"], w["v"]).transpose(1, 2).reshape(1, 1, 96), w["o"]
    )
    gate, up = F.linear(F.rms_norm(x, (96,), w["norm"]), w["gate_up"]).chunk(2, -1)
    (x + F.linear(F.silu(gate) * up, w["down"])).sum()


def probe_seconds() -> float:
    """Thread CPU seconds of one run of the fixed speed probe (6 passes of the decoder block above), after
    2 untimed passes that bring its code and data back into the caches the workload used."""
    with torch.inference_mode():
        for _ in range(2):
            _probe_block()
        t0 = time.thread_time()
        for _ in range(6):
            _probe_block()
        return time.thread_time() - t0


@dataclass(frozen=True)
class Timing:
    """The resolved ``timing`` config: the clock, the shape modelled compute is priced at, the scale."""

    mode: str
    shape: str | None = None  # modelled: a shipped shape (mixtral-8x7b, ...) or None for the run's model
    scale: float = 1.0  # measured: target seconds per host CPU second (the profile's compute_scale)
    probe: float | None = None  # calibrated measured: the profile's probe_seconds (None: not calibrated)
    dequant: str = "unfused"  # modelled: how packed weight copies are priced (odmoe/costs.py, DEQUANT)

    @property
    def virtual(self) -> bool:
        return self.mode != "wall"

    def describe(self) -> dict:
        return {
            "clock": self.mode,
            "shape": self.shape,
            "compute_scale": self.scale,
            "probe_seconds": self.probe,
            "dequant": self.dequant,
        }

    def clock(self) -> Clock:
        """A fresh clock of this timing, for one executor."""
        return Clock(self.mode, self.scale, self.probe)


def resolve_timing(node, profile, device: str = "cpu") -> Timing:
    """The run's timing from the ``timing`` config node (``mode: auto`` picks ``measured`` on an emulated
    profile and ``wall`` otherwise; ``calibrate``, unset, is on where the clock is ``measured`` and the
    profile has a ``probe_seconds``); every impossible combination is one clear error."""
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
    # None (the default): calibrated wherever the clock is measured and the profile names its reference host's
    # probe_seconds (results record which: probe_seconds in describe()); true: required
    calibrate = raw.get("calibrate")
    if calibrate and mode != "measured":
        raise OdmoeError(f"timing.calibrate corrects thread CPU time; it needs timing=measured, not {mode}")
    probe = None
    if mode == "measured" and calibrate is not False:
        probe = getattr(profile, "probe_seconds", None)
        if calibrate and not probe:
            raise OdmoeError(
                f"timing.calibrate needs the hardware profile's probe_seconds, which {profile.name} lacks: "
                "measure it on the reference host (the median of odmoe.clock.probe_seconds() over a quiet "
                "minute) and set hardware.probe_seconds=VALUE, or leave timing.calibrate unset or false"
            )
    dequant = str(raw.get("dequant") or "unfused")
    if dequant not in DEQUANT:
        raise OdmoeError(f"unknown timing.dequant {dequant!r}; use {' or '.join(DEQUANT)}")
    if dequant != "unfused" and mode != "modelled":
        raise OdmoeError(
            f"timing.dequant prices packed copies on the modelled clock; it needs timing=modelled, not {mode}"
        )
    return Timing(mode, None if shape is None else str(shape), scale, probe, dequant)


class Clock:
    """One executor's time ``V`` and its zero-stall bound ``B`` (see the module docstring).

    Use from the one thread whose compute it times (``measured`` reads that thread's CPU time).
    """

    def __init__(self, mode: str = "measured", scale: float = 1.0, probe: float | None = None):
        if mode not in TIMINGS:
            raise OdmoeError(f"unknown clock {mode!r}; use one of {', '.join(TIMINGS)}")
        self.mode, self.scale = mode, float(scale)
        self.probe = probe if mode == "measured" else None  # the reference host's probe_seconds
        self.speed = 1.0  # reference-host seconds per host second, from the last probe
        if self.probe is not None:
            self._measure_speed()  # now, so that the first PROBE_INTERVAL is charged at the host's speed too
        self._since_probe = 0.0
        self.t = 0.0  # V at the last sync
        self.tb = 0.0  # B at the last sync
        self.stall = 0.0  # time V spent waiting for copies
        self._host = {"measured": time.thread_time, "wall": time.perf_counter}.get(mode)
        self._mark = self._host() if self._host else 0.0
        self._paused = 0

    @property
    def virtual(self) -> bool:
        return self.mode != "wall"

    def _measure_speed(self) -> None:
        seconds = probe_seconds()
        # A reading of 0 is no reading (keep the last speed): one of three OD-MoE runs on the 2-core KVM guest
        # died of a float division by zero here, the thread's CPU clock not advancing over a whole probe.
        if seconds > 0:
            self.speed = self.probe / seconds

    def reset(self) -> None:
        """Time 0 is now: setup (loading models, building stores) is not the system's time."""
        self.t = self.tb = self.stall = 0.0
        self._mark = self._host() if self._host else 0.0

    def _sync(self) -> None:
        if self._host is not None:
            h = self._host()
            d = 0.0 if self._paused and self.mode == "measured" else h - self._mark
            if self.probe is not None and d > 0:
                self._since_probe += d
                if self._since_probe >= PROBE_INTERVAL:
                    self._since_probe = 0.0
                    self._measure_speed()
                    h = self._host()  # the probe's own time is not the system's
                d *= self.speed
            d *= self.scale
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
