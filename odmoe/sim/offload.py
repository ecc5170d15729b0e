"""Single-device baselines: the fully cached model and expert offloading with a per-layer cache and prefetch.

One GPU runs every layer; routed experts live in host DRAM and cross one host->device link. Per MoE layer:
attention and router run (``costs.main``); the experts the router picked that are not resident are copied on
demand (FIFO behind any copy already on the link; a copy is never cancelled); the expert step runs when all of
them are resident. With prefetch, right after layer j's router the engine copies the experts predicted for
layer j + d (``lookahead``) into that layer's cache, so a correct prediction hides the copy behind the layers
in between (the next-layer-gate family of Mixtral-Offloading and AdapMoE has d = 1; HOBBIT's stacked gates up to
4). Each layer keeps an LRU cache of ``cache_per_layer`` experts (eviction group = layer, as Mixtral-Offloading);
an expert copied in takes a slot at once (evicting the least recently used one that the current token does not
need); ``writeback`` also copies the evicted expert back (doubling link traffic, as Mixtral-Offloading's
published ``_swap``). Hits, misses and stalls come from a routing array: a real trace (``odmoe.trace``) or
:func:`synthetic_routing`.

Prefill: each layer copies the experts its prompt routes to that are not resident, after the router, then runs
them all. Experts are computed in their stored format (``expert_fmt``: a native fp16 or int8 kernel reading
that format's bytes), not unpacked first as the offload engine's nf4 and HQQ copies are (``odmoe/costs.py``). The fully cached model (:func:`simulate_cached`) has every expert resident and never uses the link.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from odmoe.errors import OdmoeError
from odmoe.sim.shapes import ModelShape


@dataclass(frozen=True)
class OffloadPolicy:
    name: str = "lru"
    cache_per_layer: int = 2
    expert_fmt: str = "fp16"
    prefetch: int = 0  # experts prefetched per layer from the predictor; 0 = no prefetch
    lookahead: int = 1  # d
    writeback: bool = False


@dataclass
class OffloadResult:
    ttft: float
    token_times: np.ndarray  # emission times of the decode tokens
    hits: int  # routed experts found resident (or already in flight) when the router ran
    lookups: int
    stall: float  # total time expert steps waited for copies
    link_busy: float  # total copy time

    @property
    def decode_time(self) -> float:
        return float(self.token_times[-1] - self.ttft) if len(self.token_times) else 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else math.nan


def synthetic_routing(
    iterations: int, layers: int, num_experts: int, k: int, seed: int = 0, stickiness: float = 0.0
) -> np.ndarray:
    """``[N, L, k]`` routing: uniform top-k per (token, layer); with probability ``stickiness`` an expert of the
    previous token at that layer is kept (temporal locality, which caches exploit)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((iterations, layers, k), dtype=np.int64)
    for n in range(iterations):
        for j in range(layers):
            keep = [e for e in (out[n - 1, j] if n else []) if rng.random() < stickiness]
            rest = [e for e in rng.permutation(num_experts) if e not in keep]
            out[n, j] = (keep + rest)[:k]
    return out


def load_routing(trace_dir: str, iterations: int, layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode and prefill routing of the first prompt of a trace directory (``+exp=reference``'s ``traces/``):
    ``[iterations, Lm, k]`` (a shorter trace is repeated) and ``[P, Lm, k]``."""
    from odmoe.trace import load_traces

    trace = load_traces(trace_dir)[0]
    if trace.decode_experts.shape[1] != layers:
        raise OdmoeError(
            f"{trace_dir} holds routing of {trace.decode_experts.shape[1]} MoE layers; the simulated model has {layers} "
            "(simulate the traced model: exp.model=model)"
        )
    reps = -(-iterations // len(trace.decode_experts))
    return np.tile(trace.decode_experts, (reps, 1, 1))[:iterations], trace.prefill_experts


def predict_sets(routing: np.ndarray, recall: float, num_experts: int, seed: int = 0) -> np.ndarray:
    """Predicted sets with per-expert recall ``recall``: each true expert kept with that probability, else replaced
    by a random expert outside the true set."""
    rng = np.random.default_rng(seed)
    pred = routing.copy()
    n, layers, k = routing.shape
    for a in range(n):
        for j in range(layers):
            true = set(routing[a, j].tolist())
            others = [e for e in rng.permutation(num_experts) if e not in true]
            for s in range(k):
                if rng.random() >= recall:
                    pred[a, j, s] = others.pop()
    return pred


def simulate_cached(shape: ModelShape, costs, prompt_len: int, output_len: int) -> tuple[float, float]:
    """(TTFT, decode time) of the fully cached model; prefill touches the expected number of distinct experts under
    uniform routing, E (1 - (1 - k/E)^P)."""
    s = shape
    active = s.num_experts * (1 - (1 - s.top_k / s.num_experts) ** prompt_len)
    ttft = sum(costs.cached_layer(i, prompt_len, 0, active) for i in range(s.num_layers)) + costs.head(1)
    decode = 0.0
    for n in range(output_len - 1):
        decode += sum(costs.cached_layer(i, 1, prompt_len + n) for i in range(s.num_layers)) + costs.head(1)
    return ttft, decode


def simulate_offload(
    shape: ModelShape,
    costs,
    policy: OffloadPolicy,
    routing: np.ndarray,
    prompt_len: int,
    predicted: np.ndarray | None = None,
    prefill_routing: np.ndarray | None = None,
) -> OffloadResult:
    """One request: prefill of ``prompt_len`` tokens, then one decode iteration per row of ``routing`` ``[N, Lm, k]``."""
    s = shape
    if routing.shape[1] != s.num_moe_layers:
        raise OdmoeError(f"routing covers {routing.shape[1]} MoE layers; the model has {s.num_moe_layers}")
    if policy.prefetch and predicted is None:
        raise OdmoeError(f"policy {policy.name} prefetches but no predicted expert sets were given")
    if not 1 <= policy.cache_per_layer <= s.num_experts or policy.cache_per_layer < s.top_k:
        raise OdmoeError(f"cache_per_layer must lie in {s.top_k}..{s.num_experts} (top-k .. E)")
    slot = {layer: j for j, layer in enumerate(s.moe_layers)}
    t_load = costs.gpu_load(policy.expert_fmt) * (2 if policy.writeback else 1)
    cache = [OrderedDict((e, -math.inf) for e in range(policy.cache_per_layer)) for _ in s.moe_layers]
    gpu = link = 0.0
    hits = lookups = 0
    stall = busy = 0.0

    def fetch(j: int, e: int, at: float, keep: set[int]) -> float:
        nonlocal link, busy
        if len(cache[j]) >= policy.cache_per_layer:
            victim = next((v for v in cache[j] if v not in keep), None)
            if victim is None:
                raise OdmoeError(
                    f"cache of {policy.cache_per_layer} experts cannot hold the {len(keep)} a layer needs"
                )
            del cache[j][victim]
        start = max(at, link)
        link = start + t_load
        busy += t_load
        cache[j][e] = link
        return link

    # ---- prefill ----
    for i in range(s.num_layers):
        gpu += costs.main(i, prompt_len, 0)
        if i not in slot:
            continue
        j = slot[i]
        if prefill_routing is not None:
            active = sorted(set(prefill_routing[:, j].ravel().tolist()))
        else:
            expected = s.num_experts * (1 - (1 - s.top_k / s.num_experts) ** prompt_len)
            active = list(range(min(s.num_experts, math.ceil(expected))))
        if not active:
            continue
        tokens = prompt_len * s.top_k / len(active)
        one = costs.gpu_experts(1, tokens, policy.expert_fmt) - costs.gpu_experts(
            0, tokens, policy.expert_fmt
        )
        routed = gpu
        gpu += costs.gpu_experts(0, tokens, policy.expert_fmt)
        for e in active:  # experts beyond the cache stream through it, each computed once resident
            ready = cache[j][e] if e in cache[j] else fetch(j, e, routed, set())
            stall += max(0.0, ready - gpu)
            gpu = max(gpu, ready) + one
            cache[j].move_to_end(e)
    gpu += costs.head(1)
    ttft = gpu

    # ---- decode ----
    times = np.zeros(routing.shape[0])
    for n in range(routing.shape[0]):
        ctx = prompt_len + n
        for i in range(s.num_layers):
            gpu += costs.main(i, 1, ctx)
            if i not in slot:
                continue
            j = slot[i]
            need = set(routing[n, j].tolist())
            ready = gpu
            for e in routing[n, j].tolist():
                lookups += 1
                if e in cache[j]:
                    hits += 1
                    ready = max(ready, cache[j][e])
                else:
                    ready = max(ready, fetch(j, e, gpu, need))
            if policy.prefetch and j + policy.lookahead < s.num_moe_layers:
                t = j + policy.lookahead
                for e in predicted[n, t, : policy.prefetch].tolist():
                    if e not in cache[t]:
                        fetch(t, e, gpu, set())
            stall += max(0.0, ready - gpu)
            gpu = max(gpu, ready) + costs.gpu_experts(s.top_k, 1, policy.expert_fmt)
            for e in routing[n, j].tolist():
                cache[j].move_to_end(e)
        gpu += costs.head(1)
        times[n] = gpu
    return OffloadResult(ttft, times, hits, lookups, stall, busy)
