"""Re-implementation of MoE-Infinity (Xue et al., arXiv 2401.14361; ``EfficientMoE/MoE-Infinity``;
BASELINES.md §2.2), the paper's design.

What the original does, and where it is here:

* **Request-level activation tracing** (paper: sequence-level expert activation tracing;
  ``memory/expert_tracer.py``): the running request's expert activation matrix (EAM) is matched against an EAM
  collection (EAMC) of capacity ``eamc_capacity`` (default 1000, the code's ``trace_capacity``). The
  collection is traced **offline** before serving (``load_trace``): ``eamc_traces`` calibration-split requests
  (default 1000, the capacity; the calibration split holds fewer 64-token requests, so all of them are traced
  and the row's ``calib_size`` says how many), never the evaluation prompts
  (``baselines.calibrate.eam_collection``). Served requests join the collection in its free slots, then
  replace the least-accessed online entry.
* **Activation-aware prefetch** (paper: activation-aware expert prefetching; the prefetch the public code
  never calls, issue #66): after each decode layer, up to ``prefetch_per_layer`` (default 2 = top-k)
  not-resident experts of any later layer, in descending decayed score of the matched EAM.
* **Activation-aware caching** (paper: activation-aware expert caching): evict the expert with the lowest
  decayed matched score (cyclic layer distance, our extension for decode), ties least recently used.
* No quantization, no skipping: lossless; experts fp32 (the model's precision).
* One global cache of ``cache_fraction`` of all experts (default 0.20: (21.5 GB - 3.3 GB of FP16 non-expert
  weights) / 352 MB FP16 experts = 52 of Mixtral's 256 experts).

Deviations: an offline request is a calibration window run teacher-forced (its continuation is the corpus's,
not the model's own decode); matching runs on the host CPU in numpy (the original on the GPU), so its cost is
on the measured compute.
"""

from __future__ import annotations

import numpy as np

from baselines.cache import ScoreEviction
from baselines.calibrate import eam_collection
from baselines.engine import Policy, full_plan
from baselines.predict import ActivationMatrixTracer


def global_capacity(engine, fraction: float, fmt: str) -> int:
    """Bytes of ``fraction`` of all experts in ``fmt`` (at least top-k experts)."""
    total = len(engine.layers) * engine.adapter.num_experts
    n = max(engine.adapter.top_k, round(fraction * total))
    return n * engine.fmt_bytes[fmt]


class MoEInfinity(Policy):
    name = "moe_infinity"

    def __init__(
        self, tracer: ActivationMatrixTracer, cache_fraction: float = 0.20, prefetch_per_layer: int = 2
    ):
        self.tracer = tracer
        self.cache_fraction = float(cache_fraction)
        self.prefetch_per_layer = int(prefetch_per_layer)

    def capacity(self, engine):
        return {None: global_capacity(engine, self.cache_fraction, self.fmt)}, lambda key: None

    def install(self, engine):
        self.slot = {layer: i for i, layer in enumerate(engine.layers)}

    def make_eviction(self):
        def score(entry, ctx):
            table = ctx.extra.get("scores")
            return 0.0 if table is None else float(table[self.slot[entry.layer], entry.expert])

        return ScoreEviction(score, "activation_aware")

    def eviction_extra(self, engine):
        return {"scores": self.tracer.scores(engine.layers.index(engine.layer_now), cyclic=True)}

    def begin_request(self, engine, prompt):
        self.tracer.begin()

    def end_request(self, engine):
        self.tracer.end()

    def plan(self, engine, layer, hidden, idx, w):
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

    def report(self) -> dict:
        return {
            "calib_size": self.tracer.persistent,
            "calibration": f"EAMC: {self.tracer.persistent} offline calib-split traces, "
            f"capacity {self.tracer.capacity}",
        }


def build(cfg: dict, lm, hardware) -> MoEInfinity:
    capacity = int(cfg.get("eamc_capacity", 1000))
    tracer = ActivationMatrixTracer(lm.adapter.num_moe_layers, lm.adapter.num_experts, capacity)
    traces = min(int(cfg.get("eamc_traces", 1000)), capacity)
    if traces > 0:
        tracer.load(eam_collection(lm, traces))
    return MoEInfinity(tracer, cfg.get("cache_fraction", 0.20), cfg.get("prefetch_per_layer", 2))
