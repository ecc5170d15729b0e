"""The fully cached model (every expert resident on one device): OD-MoE's upper bound, measured the same way.

This is the paper's "Transformers" row: the unmodified model, greedy, batch 1, KV cache, all weights
on the device. On a CPU-emulated profile its device is the same ledger the OD-MoE nodes use (weights,
KV and activations counted with the same functions), and its compute is the same CPU's, so the
decode-speed ratio OD-MoE / cached is the emulated testbed's ratio. No link or network is involved.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import DynamicCache

from odmoe.device import Ledger
from odmoe.metrics import request_speed
from odmoe.models.load import LoadedModel
from odmoe.runtime import memory
from odmoe.trace import check_length, forward_step


@torch.no_grad()
def run_cached(
    lm: LoadedModel, jobs: list[dict], threads: int = 1, collect_logits: bool = False
) -> list[dict]:
    """Decode every request ``{"id", "prompt", "output_len"}``; one result dict per request."""
    model, adapter = lm.model, lm.adapter
    adapter.clear_experts_forward()
    shape = memory.shape_from_config(model.config)
    elem = next(model.parameters()).element_size()
    dev = next(model.parameters()).device
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ledger = Ledger(None, "cached device")
    ledger.set("weights/all", weights)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = []
    try:
        for i, job in enumerate(jobs):
            prompt = [int(t) for t in job["prompt"]]
            P, out_len = len(prompt), int(job["output_len"])
            check_length(model, P, out_len)
            ledger.set("kv", 0)
            ledger.reset_peak()
            cache = DynamicCache(config=model.config)
            t0 = time.perf_counter()
            ledger.set("activations", _act(shape, P, P, elem))
            logits = forward_step(model, torch.tensor([prompt], device=dev), cache)
            token = int(logits.argmax())
            t_first = time.perf_counter()
            ledger.set("kv", _kv(cache))
            ledger.set("activations", 0)
            prefill_peak = ledger.peak
            ledger.reset_peak()
            tokens, all_logits = [token], [logits.float().cpu().numpy()]
            for n in range(1, out_len):
                ledger.set("activations", _act(shape, 1, P + n, elem))
                logits = forward_step(model, torch.tensor([[token]], device=dev), cache)
                token = int(logits.argmax())
                tokens.append(token)
                if collect_logits:
                    all_logits.append(logits.float().cpu().numpy())
                ledger.set("kv", _kv(cache))
            t_last = time.perf_counter()
            ledger.set("activations", 0)
            row = {
                "request": job.get("id", str(i)),
                "job": i,
                **request_speed(P, tokens, t0, t_first, t_last),
                "peak_total": int(ledger.peak),
                "prefill_peak_total": int(prefill_peak),
            }
            if collect_logits:
                row["logits"] = np.stack(all_logits)
            out.append(row)
    finally:
        torch.set_num_threads(saved)
    return out


def _act(shape: memory.Shape, tokens: int, context: int, elem: int) -> int:
    return memory.main_activation_bytes(shape, tokens, context, elem) + memory.worker_activation_bytes(
        tokens, shape.hidden, shape.expert_ff, elem
    )


def _kv(cache: DynamicCache) -> int:
    return sum(
        layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.keys is not None
    )
