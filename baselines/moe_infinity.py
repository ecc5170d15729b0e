"""Re-implementation of MoE-Infinity (Xue et al., arXiv 2401.14361; BASELINES.md §2.2), paper version.

* Request-level activation tracing: the request's expert activation matrix (EAM) is matched against a
  store of past requests' EAMs (EAMC, ``eamc_capacity``, FIFO), warmed with ``warmup_prompts``
  calibration requests (MoE-Infinity traces offline before serving).
* Prefetch (decode): after each layer, up to ``prefetch_per_layer`` (default top-k = 2) not-resident
  experts of *any* later layer in descending decayed score (the prefetch the public code never calls,
  issue #66; the paper's design).
* Activation-aware eviction: the lowest decayed matched-activation score, cyclic layer distance.
* No quantization, no skipping (none listed): lossless; experts fp32 (the model's precision).
* One global cache of ``cache_fraction`` of all experts (default 0.20: (21.5 GB - 3.3 GB of FP16
  non-expert weights) / 352 MB FP16 experts = 52 of Mixtral's 256 experts).
"""

from __future__ import annotations

import numpy as np

from baselines.cache import ScoreEviction
from baselines.calibrate import calibration_traces
from baselines.engine import Policy, full_plan
from baselines.predict import ActivationMatrixTracer


def global_capacity(engine, fraction: float, fmt: str) -> int:
    """Bytes of ``fraction`` of all experts in ``fmt`` (at least top-k experts)."""
    total = len(engine.layers) * engine.adapter.num_experts
    n = max(engine.adapter.top_k, round(fraction * total))
    return n * engine.fmt_bytes[fmt]


class MoEInfinity(Policy):
    name = "moe_infinity"

    def __init__(self, cache_fraction: float = 0.20, prefetch_per_layer: int = 2, eamc_capacity: int = 64):
        self.cache_fraction = float(cache_fraction)
        self.prefetch_per_layer = int(prefetch_per_layer)
        self.eamc_capacity = int(eamc_capacity)
        self.tracer: ActivationMatrixTracer | None = None
        self._scores: np.ndarray | None = None

    def capacity(self, engine):
        return {None: global_capacity(engine, self.cache_fraction, self.fmt)}, lambda key: None

    def _ensure(self, engine):
        if self.tracer is None:
            self.tracer = ActivationMatrixTracer(
                len(engine.layers), engine.adapter.num_experts, self.eamc_capacity
            )
            self.slot = {layer: i for i, layer in enumerate(engine.layers)}

    def warm(self, traces) -> None:
        """Fill the EAMC from calibration traces (prefill + decode routing counts)."""
        for t in traces:
            self.tracer.begin()
            for experts in (t.prefill_experts, t.decode_experts):
                for s in range(experts.shape[1]):
                    np.add.at(self.tracer.eam[s], experts[:, s].reshape(-1), 1)
            self.tracer.end()

    def make_eviction(self):
        def score(entry, ctx):
            table = ctx.extra.get("scores")
            return 0.0 if table is None else float(table[self.slot[entry.layer], entry.expert])

        return ScoreEviction(score, "activation_aware")

    def eviction_extra(self, engine):
        self._ensure(engine)
        slot = self.slot[engine.layer_now]
        return {"scores": self.tracer.scores(slot, cyclic=True)}

    def begin_request(self, engine, prompt):
        self._ensure(engine)
        self.tracer.begin()

    def end_request(self, engine):
        self.tracer.end()

    def plan(self, engine, layer, hidden, idx, w):
        self._ensure(engine)
        self.tracer.record(self.slot[layer], idx)
        return full_plan(idx, self.fmt), w

    def prefetch(self, engine, layer, hidden, idx, w):
        if self.prefetch_per_layer <= 0 or hidden.shape[0] != 1:
            return
        scores = self.tracer.scores(self.slot[layer])
        order = np.argsort(-scores, axis=None, kind="stable")
        keys = []
        for flat in order:
            s, e = divmod(int(flat), scores.shape[1])
            if scores[s, e] <= 0 or len(keys) == self.prefetch_per_layer:
                break
            key = (engine.layers[s], e, self.fmt)
            if key not in engine.cache:
                keys.append(key)
        engine.prefetch(keys)


def build(cfg: dict, lm, hardware) -> MoEInfinity:
    policy = MoEInfinity(
        cfg.get("cache_fraction", 0.20), cfg.get("prefetch_per_layer", 2), cfg.get("eamc_capacity", 64)
    )
    policy.tracer = ActivationMatrixTracer(
        lm.adapter.num_moe_layers, lm.adapter.num_experts, policy.eamc_capacity
    )
    policy.slot = {layer: i for i, layer in enumerate(lm.adapter.moe_layers)}
    warmup = int(cfg.get("warmup_prompts", 2))
    if warmup > 0:
        policy.warm(calibration_traces(lm, warmup))
    return policy
