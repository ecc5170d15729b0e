"""The CUDA paths on a real GPU, on the micro models (marked ``cuda``: skipped where no CUDA device is visible).

What the CPU suite cannot reach: training on the GPU, bitsandbytes' CUDA kernels in the SEP shadow, the engine's
real side-stream copies with stalls from CUDA events and the model's experts off the device, the worker's
``CudaDevice`` (pinned host store, side-stream loads, allocator peaks), and an OD-MoE cluster whose ranks share
one GPU over ``cpu:gloo,cuda:nccl``. ``benchmarks/device_check.py`` runs the same paths at full size.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from odmoe.hardware import load_profile

pytestmark = pytest.mark.cuda
OUT = 10


@pytest.fixture(scope="module")
def gpu_lm(micro_mixtral_dir):
    from odmoe.models import load_model

    return load_model("micro-mixtral", device="cuda")


def _prompt(lm) -> list[int]:
    return lm.tokenizer("In the beginning God created the heaven")["input_ids"][:8]


def test_training_runs_on_the_gpu(tmp_path):
    from odmoe.models.tiny import train_embedded

    summary = train_embedded("micro-mixtral", out_dir=tmp_path / "m", progress=False, device="cuda")
    assert summary["device"] != "cpu" and (tmp_path / "m" / "model.safetensors").exists()
    assert math.isfinite(summary["perplexity"]) and summary["perplexity"] < summary["unigram_perplexity"]


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_shadow_runs_bitsandbytes_on_cuda_and_routes_like_the_cpu_shadow(gpu_lm, micro_mixtral, precision):
    import bitsandbytes as bnb

    from odmoe.metrics import hits
    from odmoe.predict.sep import Alignment, record_reference, replay
    from odmoe.predict.shadow import build_shadow

    recall = {}
    for lm in (gpu_lm, micro_mixtral):
        record = record_reference(lm.model, lm.adapter, "p", _prompt(lm), 16)
        shadow = build_shadow(lm.model, lm.adapter, precision)
        device = next(lm.model.parameters()).device.type
        quantized = shadow.adapter.experts(shadow.adapter.moe_layers[0]).odmoe_quantized
        assert quantized.gate_up_data.device.type == device
        linears = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
        assert any(isinstance(m, linears) and m.weight.device.type == device for m in shadow.model.modules())
        (em,), _ = replay(shadow, [record], Alignment.parse("token_kv"), "auto")
        c = hits(em.experts, record.trace.decode_experts)
        recall[device] = c.sum() / (lm.adapter.top_k * c.size)
    assert recall["cuda"] > 0.8 and abs(recall["cuda"] - recall["cpu"]) <= 0.05, recall


def test_engine_on_cuda_copies_for_real_and_keeps_lossless_systems_exact(gpu_lm):
    from baselines import build_engine
    from odmoe.trace import reference_decode

    prompt = _prompt(gpu_lm)
    ref = reference_decode(gpu_lm.model, gpu_lm.adapter, "p", prompt, OUT).tokens.tolist()
    systems = [
        ("cached", {}),
        ("cpu_only", {}),
        ("moe_infinity", dict(cache_fraction=0.1, prefetch_per_layer=2, eamc_traces=8)),
        ("mixtral_offloading", dict(quantize="none", attention="none", experts_per_layer=1, prefetch=2)),
    ]
    first = gpu_lm.adapter.experts(gpu_lm.adapter.moe_layers[0])
    peaks = {}
    for name, cfg in systems:
        engine = build_engine(name, cfg, gpu_lm, load_profile("h200"))
        try:
            if name != "cpu_only":  # the model's own experts leave the GPU while an engine serves them
                assert first.gate_up_proj.numel() == 0
            res = engine.generate(prompt, OUT)
        finally:
            engine.uninstall()
        assert res.tokens == ref, name
        assert engine.timing.mode == "wall"
        peaks[name] = res.cuda_peak_bytes
        if name in ("moe_infinity", "mixtral_offloading"):
            assert res.stats.loads > 0 and res.link_bytes > 0
            assert 0 < res.stall <= res.ttft + res.decode_time  # the compute stream waited on some copy
    experts = gpu_lm.adapter.num_moe_layers * gpu_lm.adapter.num_experts * gpu_lm.adapter.expert_bytes()
    assert peaks["mixtral_offloading"] < peaks["cached"] - experts / 2  # one expert per layer resident, not 8
    assert peaks["cpu_only"] is None
    assert first.gate_up_proj.is_cuda and first.gate_up_proj.numel() > 0  # restored for the next system


def test_cuda_link_stall_comes_from_events():
    from baselines.timing import CudaLink
    from odmoe.clock import Clock

    link, clock = CudaLink(torch.device("cuda")), Clock("wall")
    host = torch.arange(1 << 22, dtype=torch.float32).pin_memory()  # 16 MB: a copy the GPU must wait for
    (dev,), handle = link.copy((host,), host.numel() * 4, clock)
    link.wait(handle, clock)
    doubled = dev * 2
    torch.cuda.synchronize()
    stalled = link.settle(clock)
    assert torch.equal(doubled.cpu(), host * 2)
    assert 0 < stalled < 1.0 and clock.stall == stalled and link.bytes_moved == host.numel() * 4


def test_cuda_device_loads_slots_from_pinned_memory():
    from odmoe.device import CudaDevice

    dev = CudaDevice(load_profile("h200"), "worker", torch.device("cuda", 0))
    dev.alloc_slots(2, 4096, torch.float32)
    hosts = [dev.host_store(torch.arange(4096, dtype=torch.float32) * (i + 1)) for i in range(2)]
    assert all(h.is_pinned() for h in hosts)
    loads = [dev.load(i, h) for i, h in enumerate(hosts)]
    assert all(load.wait(10) for load in loads)
    assert torch.equal(dev.slots[1].cpu(), hosts[1]) and loads[1].done >= loads[1].start > 0
    assert dev.peak_bytes() >= 2 * 4096 * 4 and dev.loads == 2


def test_cluster_shares_one_gpu_and_matches_the_cached_model(gpu_lm, tmp_path):
    """Main, int8 shadow and two workers, all on the one GPU, NCCL initialised beside gloo: the cached tokens."""
    from omegaconf import OmegaConf

    from odmoe.launch import spawn_local
    from odmoe.paths import repo_root
    from odmoe.trace import reference_decode

    base = OmegaConf.to_container(OmegaConf.load(repo_root() / "conf/system/odmoe.yaml"))
    prompt = _prompt(gpu_lm)
    spec = {
        "model": {"name": gpu_lm.name, "path": str(gpu_lm.path), "dtype": "float32"},
        "hardware": OmegaConf.to_container(OmegaConf.load(repo_root() / "conf/hardware/h200.yaml")),
        "timing": {"mode": "wall", "shape": None, "scale": 1.0},
        "system": {**base, "workers": 2, "timeout_s": 60, "shadow": {**base["shadow"], "precision": "int8"}},
        "device": "cuda",
        "seed": 0,
        "threads": 1,
        "collect_logits": True,
        "jobs": [{"id": "a", "prompt": prompt, "output_len": OUT}],
    }
    (r,) = spawn_local(spec, tmp_path)
    ref = reference_decode(gpu_lm.model, gpu_lm.adapter, "p", prompt, OUT).tokens.tolist()
    assert r["tokens"] == ref and r["device"].startswith("cuda")
    assert {"cpu:gloo", "cuda:nccl"} <= set(r["backend"].split(","))  # messages on gloo, NCCL initialised
    assert r["clock"] == "wall" and 0 <= r["stall_s"] and min(r["peak_workers"]) > 0
    assert np.isfinite(np.load(tmp_path / "logits-0.npy")).all()
