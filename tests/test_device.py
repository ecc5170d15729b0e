"""The emulated device: ledger arithmetic and capacity, the virtual-time copy link; the memory model."""

from __future__ import annotations

import pytest
import torch

from odmoe.clock import Clock
from odmoe.device import EmulatedDevice, Ledger
from odmoe.errors import OdmoeError
from odmoe.hardware import load_profile
from odmoe.runtime import memory


def test_ledger_tracks_total_peak_and_categories():
    led = Ledger(capacity=1000)
    led.set("weights/a", 300)
    led.set("kv", 200)
    led.set("kv", 500)  # a growing cache is one entry
    assert led.total == 800 and led.peak == 800
    led.free("kv")
    assert led.total == 300 and led.peak == 800
    assert led.peak_by_category() == {"weights": 300, "kv": 500}
    led.reset_peak()
    assert led.peak == 300
    with pytest.raises(OdmoeError, match="1,200 bytes needed"):
        led.set("slots/0", 900)


def test_emulated_link_copies_for_real_and_completes_in_virtual_time():
    """The copy happens at once (the clock paused), the load completes bytes / bandwidth + latency after its
    issue on the virtual timeline, and a second load queues behind the first on the one copy engine."""
    profile = load_profile("cpu-emulated").with_(h2d_bandwidth=1e6, h2d_latency=0.002)
    clock = Clock("modelled")
    dev = EmulatedDevice(profile, "worker", clock)
    dev.alloc_slots(1, 5000, torch.float32)  # 20 kB slot
    assert dev.ledger.total == 20_000
    host = torch.arange(5000, dtype=torch.float32)
    load = dev.load(0, host, at=1.0)
    assert torch.equal(dev.slots[0], host) and load.wait(0)
    assert load.done == pytest.approx(1.022)  # 20 kB / 1 MB/s + 2 ms
    second = dev.load(0, host, at=1.001)  # one link: starts when the first is done
    assert second.done == pytest.approx(1.044) and dev.loads == 2 and dev.bytes_loaded == 40_000
    assert clock.now() == 0.0  # issuing a load costs the issuer nothing
    assert clock.wait_copy(second.done) == pytest.approx(1.044) and clock.now() == pytest.approx(1.044)


def test_modelled_load_bytes_price_another_models_expert():
    """timing=modelled at another shape: a load costs that shape's expert bytes, not the bytes copied."""
    profile = load_profile("cpu-emulated").with_(h2d_bandwidth=1e6, h2d_latency=0.0)
    dev = EmulatedDevice(profile, "worker", Clock("modelled"), nbytes=3e6)
    dev.alloc_slots(1, 10, torch.float32)
    assert dev.load(0, torch.zeros(10), at=0.0).done == pytest.approx(3.0)


def test_memory_model_prices_mixtral_like_the_paper():
    shape = memory.shape_from_config(memory.sim_model_config("mixtral-8x7b"))
    assert shape.expert_params == 3 * 4096 * 14336
    assert shape.non_expert_params == pytest.approx(1.6e9, rel=0.02)
    m = memory.memory_model(shape, workers=8, prompt_len=128, output_len=256, shadow_precision="int8")
    gb = {k: v / 1e9 for k, v in m.items()}
    assert gb["main"] == pytest.approx(6.6, abs=0.3)  # the paper: 7 GB
    assert gb["shadow"] == pytest.approx(46.5, abs=1.5)  # the paper: 45 GB
    assert gb["worker"] == pytest.approx(0.70, abs=0.02)  # the paper: < 1 GB
    assert gb["total"] == pytest.approx(59, abs=2)  # the paper: 60 GB
    assert gb["cached"] == pytest.approx(187, abs=2)  # the paper: 180 GB


def test_shadow_weight_model_matches_the_built_shadow(micro_mixtral):
    from odmoe.predict.shadow import build_shadow

    shape = memory.shape_from_config(micro_mixtral.model.config)
    for precision in ("fp32", "fp16"):
        shadow = build_shadow(micro_mixtral.model, micro_mixtral.adapter, precision)
        assert memory.shadow_weight_bytes(shape, precision) == shadow.weight_bytes()["total"]
    params = sum(p.numel() for p in micro_mixtral.model.parameters())
    assert shape.non_expert_params + shape.moe_layers * shape.experts * shape.expert_params == params
