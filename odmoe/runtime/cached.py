"""The fully cached model (every expert resident on one device): OD-MoE's upper bound, measured the same way.

This is the paper's "Transformers" row: the unmodified model, greedy, batch 1, KV cache, all weights
on the device (``devices`` pooled devices' memory, capacity enforced). It times on the same clock as the
OD-MoE ranks (``odmoe/clock.py``): measured (this thread's CPU time x the profile's ``compute_scale``) or
modelled (``cached_layer`` per layer at ``timing.shape``, and the LM head), so the decode-speed ratio
OD-MoE / cached is the emulated testbed's ratio. No link or network is involved.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from odmoe.clock import Clock, Timing
from odmoe.costs import Pricer, run_costs
from odmoe.decoding import next_token
from odmoe.device import Ledger
from odmoe.hardware import HardwareProfile
from odmoe.metrics import request_speed
from odmoe.models.adapter import MoEAdapter, eager_experts_forward
from odmoe.models.load import LoadedModel
from odmoe.record import ExecutorRecord
from odmoe.runtime import memory
from odmoe.runtime.kv import cache_bytes
from odmoe.trace import check_length, forward_step


class LayerTimer:
    """Times each MoE layer of the model's own eager expert loop into an ``ExecutorRecord`` on the run's
    clock (under ``timing=modelled`` each layer is charged here: attention to experts, ``cached_layer``)."""

    def __init__(self, adapter: MoEAdapter, clock: Clock, pricer: Pricer | None):
        self.record = ExecutorRecord()
        self.clock, self.pricer = clock, pricer
        self.mark = 0.0
        for layer in adapter.moe_layers:
            adapter.set_experts_forward(layer, self._hook(layer))

    def _hook(self, layer: int):
        def forward(module, hidden, top_k_index, top_k_weights):
            if self.pricer is not None:
                self.clock.charge(self.pricer.upto(layer))
            t0 = self.clock.now()
            out = eager_experts_forward(module, hidden, top_k_index, top_k_weights)
            t1 = self.clock.now()
            self.record.layer(
                layer=layer,
                t_main=t0 - self.mark,
                t_plan=0.0,
                t_demand=0.0,
                t_prefetch=0.0,
                t_experts=t1 - t0,
                computed=int(torch.unique(top_k_index).numel()),
                demand=[],
                prefetch=[],
                deferred=[],
                deferred_after=[],
                waits=[],
            )
            self.mark = t1
            return out

        return forward

    def begin_step(self, tokens: int, ctx: int) -> None:
        if self.pricer is not None:
            self.pricer.begin(tokens, ctx)
        self.mark = self.clock.now()

    def end_step(self) -> None:
        """After the step's token is chosen: the tail is LM head, token choice and bookkeeping."""
        if self.pricer is not None:
            self.clock.charge(self.pricer.finish())
        self.record.end_step(self.clock.now() - self.mark, 0.0)


@torch.no_grad()
def run_cached(
    lm: LoadedModel,
    jobs: list[dict],
    timing: Timing,
    hardware: HardwareProfile,
    threads: int = 1,
    collect_logits: bool = False,
    devices: int = 8,
) -> list[dict]:
    """Decode every request ``{"id", "prompt", "output_len"}`` on ``timing``'s clock; one result dict per
    request, with ``record``: its per-layer compute times (``odmoe.record``)."""
    model, adapter = lm.model, lm.adapter
    adapter.clear_experts_forward()
    shape = memory.shape_from_config(model.config)
    elem = next(model.parameters()).element_size()
    dev = next(model.parameters()).device
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    memory_per_device = hardware.main.memory
    ledger = Ledger(memory_per_device * devices if memory_per_device else None, "cached device")
    ledger.set("weights/all", weights)
    costs = run_costs(timing, hardware, model.config)
    pricer = None if costs is None else Pricer(costs, adapter.num_layers, "cached")
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
            clock = timing.clock()
            timer = LayerTimer(adapter, clock, pricer)
            t0 = clock.now()
            timer.begin_step(P, 0)
            ledger.set("activations", _act(shape, P, P, elem))
            logits = forward_step(model, torch.tensor([prompt], device=dev), cache)
            token = next_token(model, prompt, logits)
            timer.end_step()
            t_first = clock.now()
            ledger.set("kv", cache_bytes(cache))
            ledger.set("activations", 0)
            prefill_peak = ledger.peak
            ledger.reset_peak()
            tokens, all_logits = [token], [logits.float().cpu().numpy()]
            for n in range(1, out_len):
                timer.begin_step(1, P + n - 1)
                ledger.set("activations", _act(shape, 1, P + n, elem))
                logits = forward_step(model, torch.tensor([[token]], device=dev), cache)
                token = next_token(model, prompt + tokens, logits)
                tokens.append(token)
                if collect_logits:
                    with clock.paused():
                        all_logits.append(logits.float().cpu().numpy())
                ledger.set("kv", cache_bytes(cache))
                timer.end_step()
            t_last = clock.now()
            ledger.set("activations", 0)
            row = {
                "request": job.get("id", str(i)),
                "job": i,
                **request_speed(P, tokens, t0, t_first, t_last),
                "clock": timing.mode,
                "peak_total": int(ledger.peak),
                "prefill_peak_total": int(prefill_peak),
                "record": timer.record,
            }
            if collect_logits:
                row["logits"] = np.stack(all_logits)
            out.append(row)
    finally:
        adapter.clear_experts_forward()
        torch.set_num_threads(saved)
    return out


def _act(shape: memory.Shape, tokens: int, context: int, elem: int) -> int:
    return memory.main_activation_bytes(shape, tokens, context, elem) + memory.worker_activation_bytes(
        tokens, shape.hidden, shape.expert_ff, elem
    )
