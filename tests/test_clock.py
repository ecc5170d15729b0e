"""The virtual clock: measured time is this thread's CPU time, modelled time only what is charged,
waits are ``V = max(V, t)``, the zero-stall bound ignores copies; the one link model."""

from __future__ import annotations

import threading
import time

import pytest
from omegaconf import OmegaConf

from odmoe import clock as clock_module
from odmoe.clock import Clock, resolve_timing
from odmoe.costs import Link
from odmoe.errors import OdmoeError
from odmoe.hardware import load_profile


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_measured_clock_counts_own_cpu_time_not_sleep_nor_other_threads():
    clock = Clock("measured")
    time.sleep(0.05)  # descheduled: no CPU time
    hog = threading.Thread(target=_spin, args=(0.1,))
    hog.start()
    hog.join()  # another thread's CPU time
    assert clock.now() < 0.01
    _spin(0.05)
    assert 0.05 <= clock.now() < 0.08


def test_measured_clock_scales_and_pauses():
    clock = Clock("measured", scale=2.0)
    _spin(0.02)
    with clock.paused():
        _spin(0.05)
    assert 0.04 <= clock.now() < 0.06


def test_calibrated_clock_charges_at_the_reference_hosts_speed_and_not_the_probe(monkeypatch):
    """The probe finds the host at half the reference speed: the same burst is charged half of its CPU
    time, from the first burst on (shorter than a probe interval), and the probe's own 30 ms are charged
    to nobody."""

    def slow_host_probe() -> float:
        _spin(0.03)
        return 2e-3

    monkeypatch.setattr(clock_module, "probe_seconds", slow_host_probe)
    calibrated = Clock("measured", probe=1e-3)  # probes once now
    raw = Clock("measured")
    _spin(0.002)
    short = raw.now()
    assert short < clock_module.PROBE_INTERVAL and calibrated.speed == 0.5
    assert calibrated.now() == pytest.approx(0.5 * short, rel=0.2)
    _spin(0.05)
    burst = raw.now()
    assert calibrated.now() == pytest.approx(0.5 * burst, rel=0.05) and calibrated.speed == 0.5
    assert calibrated.now() - 0.5 * burst < 0.005  # the probe ran and was not charged
    monkeypatch.setattr(clock_module, "probe_seconds", lambda: 0.0)  # a thread CPU clock that did not advance
    _spin(0.01)
    assert calibrated.now() > 0.5 * burst and calibrated.speed == 0.5  # no reading: the last speed holds
    assert Clock("modelled", probe=1e-3).probe is None  # modelled time never reads the host


def test_modelled_clock_advances_only_by_charges_and_waits():
    clock = Clock("modelled")
    _spin(0.02)
    assert clock.now() == 0.0
    clock.charge(1.0)
    clock.receive(0.5, 0.5)  # delivered in the past: no wait
    assert clock.now() == 1.0 and clock.bound() == 1.0
    clock.receive(3.0, 2.0)  # a message: both timelines wait for it
    assert clock.now() == 3.0 and clock.bound() == 2.0
    assert clock.wait_copy(4.0) == 1.0  # a copy: only V waits
    assert clock.now() == 4.0 and clock.bound() == 2.0 and clock.stall == 1.0
    assert clock.wait_copy(3.5) == 0.0


def test_link_is_one_fifo_with_setup_and_propagation():
    nic = Link(1e6, propagation=0.01)
    a = nic.transfer(10_000, 0.0)  # 10 ms on the wire + 10 ms
    b = nic.transfer(10_000, 0.0)  # serializes behind the first
    assert a == pytest.approx(0.02) and b == pytest.approx(0.03)
    h2d = Link(1e6, setup=0.002)
    assert h2d.transfer(10_000, 1.0) == pytest.approx(1.012)
    assert h2d.transfer(10_000, 1.0) == pytest.approx(1.024)  # setup occupies the link
    assert h2d.busy == pytest.approx(0.024) and h2d.bytes_moved == 20_000


def test_receiving_port_serializes_messages_that_converge_on_it():
    """Two workers' 10 ms outputs that would both arrive at t = 1 on idle ports: the main node's port
    carries them one after another (the second lands 10 ms later); a later one is not delayed."""
    port = Link(1e6)
    assert port.receive(10_000, 1.0) == pytest.approx(1.0)
    assert port.receive(10_000, 1.0) == pytest.approx(1.01)
    assert port.receive(10_000, 1.5) == pytest.approx(1.5)
    fifo = Link.fifo()  # the simulator's: occupations priced by the caller
    assert fifo.occupy(0.2, 1.0) == 1.2 and fifo.occupy(0.1, 0.0) == pytest.approx(1.3)


def test_timing_resolution_and_its_errors():
    emulated, real = load_profile("cpu-emulated"), load_profile("host")
    assert resolve_timing(OmegaConf.create({"mode": "auto"}), emulated).mode == "measured"
    assert resolve_timing(OmegaConf.create({"mode": "auto"}), real).mode == "wall"
    t = resolve_timing({"mode": "modelled", "shape": "mixtral-8x7b"}, emulated)
    assert t.virtual and t.shape == "mixtral-8x7b"
    with pytest.raises(OdmoeError, match="timing=wall runs on real hardware"):
        resolve_timing({"mode": "wall"}, emulated)
    with pytest.raises(OdmoeError, match="with device=cuda use timing=wall"):
        resolve_timing({"mode": "measured"}, emulated, device="cuda")
    with pytest.raises(OdmoeError, match="unknown timing 'fast'"):
        resolve_timing({"mode": "fast"}, emulated)
    assert resolve_timing({"mode": "modelled", "dequant": "fused"}, emulated).dequant == "fused"
    assert resolve_timing({"mode": "measured"}, emulated).dequant == "unfused"
    with pytest.raises(OdmoeError, match="timing.dequant .* needs timing=modelled, not measured"):
        resolve_timing({"mode": "measured", "dequant": "fused"}, emulated)
    with pytest.raises(OdmoeError, match="unknown timing.dequant 'fast'; use unfused or fused"):
        resolve_timing({"mode": "modelled", "dequant": "fast"}, emulated)
    with pytest.raises(OdmoeError, match="timing.shape .* needs timing=modelled"):
        resolve_timing({"mode": "measured", "shape": "mixtral-8x7b"}, emulated)
    calibrated = resolve_timing({"mode": "measured", "calibrate": True}, emulated)
    assert calibrated.probe == emulated.probe_seconds and calibrated.clock().probe == emulated.probe_seconds
    assert resolve_timing({"mode": "measured"}, emulated).probe == emulated.probe_seconds  # on by default
    assert resolve_timing({"mode": "auto"}, emulated).probe == emulated.probe_seconds
    assert resolve_timing({"mode": "measured", "calibrate": False}, emulated).clock().probe is None
    assert resolve_timing({"mode": "modelled"}, emulated).probe is None
    assert resolve_timing({"mode": "auto"}, real).probe is None  # wall: nothing to calibrate
    with pytest.raises(OdmoeError, match="calibrate .* needs timing=measured, not modelled"):
        resolve_timing({"mode": "modelled", "calibrate": True}, emulated)
    no_reference = emulated.with_(probe_seconds=None)
    assert resolve_timing({"mode": "measured"}, no_reference).probe is None  # nothing to calibrate against
    with pytest.raises(OdmoeError, match="lacks: .* hardware.probe_seconds=VALUE, or .* unset or false"):
        resolve_timing({"mode": "measured", "calibrate": True}, no_reference)
