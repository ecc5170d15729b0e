"""How long each step takes and how links queue: the one cost and link model of odmoe.

Shared by every executor: the simulator's schedulers (``odmoe.sim``), and, under ``timing=modelled``, the
OD-MoE runtime's ranks and the offload engine (``odmoe.clock``); every host->device copy and every network
message of every executor and of the simulator queues on a :class:`Link`.

The schedulers (``odmoe.sim.odmoe``, ``odmoe.sim.offload``) ask a ``Costs`` object for durations and never look
at shapes or profiles themselves, so the same schedule runs on

* :class:`ModelCosts`: a model built from a :class:`~odmoe.sim.shapes.ModelShape` and a
  :class:`~odmoe.hardware.HardwareProfile`;
* :class:`FixedCosts`: explicit constants (hand-checked schedules in the tests);
* :class:`MeasuredCosts`: per-layer times measured by the runtime, falling back to a model for what was not
  measured (:func:`load_measured`).

Compute model (a choice; the paper gives no per-step times): a step takes
``overhead + bytes / memory_bandwidth + flops / peak_flops``. The roofline terms are *added*, not maxed:
batch-1 eager kernels are too small to overlap their memory and arithmetic phases, and the additive form is the
slower, simpler bound. ``overhead`` is the profile's fixed per-layer software time (kernel launches, Python
dispatch), calibrated on the fully cached model; ``main_share`` of it goes with attention + router on the main
node and the rest with the expert step, whether one GPU runs both (cached model) or a worker runs the experts.
A worker call over several experts or a prefill mini-batch pays the expert overhead once per call.

Packed weights (a choice; the paper prices no baseline): the offload engine keeps its nf4 and HQQ copies packed
and dequantizes each into the compute format before an ordinary matmul (``baselines/lowbit.py``), and the
modelled clock prices that path by default (``timing.dequant=unfused``): read the packed copy, ``DEQUANT_FLOPS``
per weight, write the unpacked matrix, which the matmul then reads like a resident one. The originals fuse
dequantization into GPU kernels (Mixtral-Offloading's Triton matmuls); ``timing.dequant=fused`` prices those at
their ideal, the packed read alone (a 2-bit expert a tenth of an fp32 one): a bound, not what runs here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from odmoe.errors import OdmoeError
from odmoe.hardware import Device, HardwareProfile
from odmoe.sim.shapes import FORMAT_BYTES, ModelShape

TOKEN_ID_BYTES = 8  # one token id on the wire (int64): START's prompt, an alignment's token
DEQUANT_FLOPS = 2  # per packed weight: (code - zero) * scale (HQQ's Quantizer.dequantize; nf4: code * absmax)


@dataclass(frozen=True)
class Formats:
    """Storage formats. The paper's main model is fp32 (Fig. 3 caption); worker experts are unstated (fp32 is the
    reading consistent with "< 1 GB per worker", PAPER.md §2.2); the shadow is INT8 in all speed tests."""

    main: str = "fp32"  # non-expert weights on the main node, and the whole fully cached model
    worker: str = "fp32"  # expert copies loaded by workers
    shadow: str = "int8"  # the shadow's whole model
    kv: str = "fp32"  # KV cache and KV-alignment payload (full precision, 8 KB/layer for Mixtral)
    act: str = "fp32"  # activations on the wire (16 KB per token for Mixtral)

    def __post_init__(self):
        for role in ("main", "worker", "shadow", "kv", "act"):
            if getattr(self, role) not in FORMAT_BYTES:
                raise OdmoeError(
                    f"unknown {role} format {getattr(self, role)!r}; use one of {', '.join(FORMAT_BYTES)}"
                )


class Link:
    """One FIFO transfer resource: a host->device copy engine or one direction of a NIC.

    A transfer of ``nbytes`` issued at ``at`` starts when the link is free, occupies it for
    ``setup + nbytes / bandwidth`` and is delivered ``propagation`` later. A copy engine has a per-copy
    ``setup`` (``h2d_latency``) and no propagation; a NIC serializes at ``net_bandwidth`` and every message
    then travels ``net_latency`` (messages carry their payload bytes only; headers are not priced).
    """

    def __init__(self, bandwidth: float, setup: float = 0.0, propagation: float = 0.0):
        if not bandwidth or bandwidth <= 0:
            raise OdmoeError(f"link bandwidth must be positive, got {bandwidth}")
        self.bandwidth, self.setup, self.propagation = float(bandwidth), float(setup), float(propagation)
        self.free_at = 0.0
        self.busy = 0.0
        self.bytes_moved = 0

    @classmethod
    def h2d(cls, hw: HardwareProfile) -> Link:
        hw.need("h2d_bandwidth")
        return cls(hw.h2d_bandwidth, setup=hw.h2d_latency or 0.0)

    @classmethod
    def nic(cls, hw: HardwareProfile) -> Link:
        hw.need("net_bandwidth", "net_latency")
        return cls(hw.net_bandwidth, propagation=hw.net_latency)

    @classmethod
    def fifo(cls, free_at: float = 0.0) -> Link:
        """A FIFO resource whose occupations are priced by the caller (:meth:`occupy`): the simulator's NIC
        directions and copy engines, priced by its cost model (``wire``, ``load``), not by a bandwidth."""
        link = cls(math.inf)
        link.free_at = free_at
        return link

    def occupy(self, seconds: float, at: float) -> float:
        """Hold the link for ``seconds`` from the first moment after ``at`` that it is free; returns when it
        frees (the FIFO rule every executor and the simulator share)."""
        start = at if at > self.free_at else self.free_at
        self.free_at = start + seconds
        self.busy += seconds
        return self.free_at

    def transfer(self, nbytes: float, at: float) -> float:
        """Queue ``nbytes`` at time ``at``; returns the delivery time."""
        self.bytes_moved += int(nbytes)
        return self.occupy(self.setup + nbytes / self.bandwidth, at) + self.propagation

    def receive(self, nbytes: float, arrive: float) -> float:
        """The receiving end of a switch port: a message that would arrive at ``arrive`` on an idle port
        arrives once the port has carried the messages before it (cut-through, ``max(arrive, free +
        nbytes / bandwidth)``). Messages must come in order of ``arrive``."""
        self.bytes_moved += int(nbytes)
        seconds = nbytes / self.bandwidth
        return self.occupy(seconds, arrive - seconds)

    def reset(self, at: float = 0.0) -> None:
        self.free_at = at


def roofline(dev: Device, nbytes: float, flops: float) -> float:
    return nbytes / dev.mem_bandwidth + flops / dev.flops


class ModelCosts:
    """Durations from a model shape and a hardware profile (see the module docstring)."""

    def __init__(self, shape: ModelShape, hw: HardwareProfile, formats: Formats | None = None):
        hw.need(
            "main.mem_bandwidth",
            "main.flops",
            "worker.mem_bandwidth",
            "worker.flops",
            "shadow.mem_bandwidth",
            "shadow.flops",
            "h2d_bandwidth",
            "net_bandwidth",
            "net_latency",
            "layer_overhead",
            "main_share",
        )
        self.shape, self.hw, self.fmt = shape, hw, formats or Formats()
        self.latency = hw.net_latency
        self.h2d_latency = hw.h2d_latency or 0.0
        self.main_overhead = hw.layer_overhead * hw.main_share
        self.expert_overhead = hw.layer_overhead * (1.0 - hw.main_share)
        # hot path: per-layer parameter counts without routed or shared experts (those are priced apart)
        moe = set(shape.moe_layers)
        self._params = [
            shape.layer_nonexpert_params(i) - (shape.shared_params if i in moe else 0)
            for i in range(shape.num_layers)
        ]
        self._is_moe = [i in moe for i in range(shape.num_layers)]
        self._kv_bytes = shape.kv_per_token * FORMAT_BYTES[self.fmt.kv]
        self._shared = shape.shared_params
        self._expert_bytes = {f: shape.expert_bytes(f) for f in FORMAT_BYTES}

    # ---- bytes -------------------------------------------------------------------------------
    def _b(self, fmt: str) -> float:
        return FORMAT_BYTES[fmt]

    def act_bytes(self, tokens: int = 1) -> float:
        """One hidden vector per token on the wire (main -> worker, and the expert output back)."""
        return tokens * self.shape.hidden * self._b(self.fmt.act)

    def alignment_bytes(self, positions: int, token: bool = True) -> float:
        """KV entries of ``positions`` positions over all layers, plus the token id (8 bytes)."""
        return positions * self.shape.kv_bytes_per_token(self.fmt.kv) + (TOKEN_ID_BYTES if token else 0)

    def expert_bytes(self, fmt: str | None = None) -> int:
        return self._expert_bytes[fmt or self.fmt.worker]

    # ---- compute -----------------------------------------------------------------------------
    def _attention_work(self, layer: int, tokens: int, ctx: int, fmt: str) -> tuple[float, float]:
        """Bytes and FLOPs of attention, norms and router (or a dense layer's FFN) over ``tokens`` new tokens."""
        params = self._params[layer]
        kv_read = ctx * self._kv_bytes
        flops = 2 * params * tokens + self.shape.attn_flops_per_token_ctx * tokens * (ctx + (tokens + 1) / 2)
        return params * FORMAT_BYTES[fmt] + kv_read, flops

    def main(self, layer: int, tokens: int = 1, ctx: int = 0) -> float:
        """M_l: attention, norms and router (or a whole dense layer) for ``tokens`` tokens after ``ctx`` cached."""
        nbytes, flops = self._attention_work(layer, tokens, ctx, self.fmt.main)
        return self.main_overhead + roofline(self.hw.main, nbytes, flops)

    def shared(self, tokens: int = 1) -> float:
        """Shared experts of one MoE layer, on the main node (0 when the model has none)."""
        p = self.shape.shared_params
        return roofline(self.hw.main, p * self._b(self.fmt.main), 2 * p * tokens) if p else 0.0

    def expert(self, experts: int = 1, tokens: int = 1, layer: int | None = None) -> float:
        """One worker call computing ``experts`` routed experts on ``tokens`` tokens each."""
        s = self.shape
        one = roofline(self.hw.worker, self.expert_bytes(), 2 * s.expert_params * tokens)
        return self.expert_overhead + experts * one

    def load(self, layer: int | None = None) -> float:
        """Host DRAM -> device copy of one worker expert."""
        return self.h2d_latency + self.expert_bytes() / self.hw.h2d_bandwidth

    def head(self, tokens: int = 1) -> float:
        """Final norm + LM head for the positions whose logits are needed (one in decode)."""
        p = self.shape.head_params
        return roofline(self.hw.main, p * self._b(self.fmt.main), 2 * p * tokens)

    def shadow(self, layer: int, ctx: int = 0, tokens: int = 1) -> float:
        """S_l: one whole layer of the quantized shadow (attention + its own top-k experts) for ``tokens`` tokens."""
        s = self.shape
        nbytes, flops = self._attention_work(layer, tokens, ctx, self.fmt.shadow)
        if self._is_moe[layer]:
            active = s.top_k if tokens == 1 else min(s.num_experts, s.top_k * tokens)
            nbytes += (
                active * self._expert_bytes[self.fmt.shadow] + self._shared * FORMAT_BYTES[self.fmt.shadow]
            )
            flops += 2 * (s.top_k * s.expert_params + self._shared) * tokens
        return self.hw.layer_overhead + roofline(self.hw.shadow, nbytes, flops)

    def shadow_head(self) -> float:
        p = self.shape.head_params
        return roofline(self.hw.shadow, p * self._b(self.fmt.shadow), 2 * p)

    def gpu_experts(self, experts: float, tokens: float = 1, fmt: str | None = None) -> float:
        """The expert step of a single-device engine: ``experts`` resident experts of format ``fmt`` on the main GPU."""
        s = self.shape
        one = roofline(self.hw.main, self._expert_bytes[fmt or self.fmt.main], 2 * s.expert_params * tokens)
        return self.expert_overhead + experts * one

    def gpu_load(self, fmt: str | None = None) -> float:
        """One expert of format ``fmt`` over the main GPU's host->device link."""
        return self.h2d_latency + self._expert_bytes[fmt or self.fmt.main] / self.hw.h2d_bandwidth

    def cached_layer(self, layer: int, tokens: int = 1, ctx: int = 0, active: float | None = None) -> float:
        """One layer of the fully cached model on one GPU: all its weights resident, ``active`` experts touched."""
        s = self.shape
        nbytes, flops = self._attention_work(layer, tokens, ctx, self.fmt.main)
        if self._is_moe[layer]:
            active = s.top_k if active is None else active
            p = s.shared_params
            nbytes += active * self._expert_bytes[self.fmt.main] + p * self._b(self.fmt.main)
            flops += 2 * (s.top_k * s.expert_params + p) * tokens
        return self.hw.layer_overhead + roofline(self.hw.main, nbytes, flops)

    # ---- network -----------------------------------------------------------------------------
    def wire(self, nbytes: float) -> float:
        """Serialization time of a message on one NIC direction (latency is separate: ``self.latency``)."""
        return nbytes / self.hw.net_bandwidth


@dataclass
class FixedCosts:
    """Every duration given explicitly (seconds); for hand-checked schedules and what-if reasoning.

    ``t_expert`` is per expert (a call over n experts takes n * t_expert), ``t_load`` per expert copy; prefill scales
    main and expert times linearly with tokens. Messages take ``latency + bytes / bandwidth`` with one hidden
    vector weighing ``hidden_bytes`` and one position of KV alignment ``kv_bytes``.
    """

    t_main: float = 1.0
    t_expert: float = 1.0
    t_load: float = 1.0
    t_shadow: float = 0.5
    t_head: float = 0.0
    t_shadow_head: float = 0.0
    t_shared: float = 0.0
    t_cached: float = 2.0
    latency: float = 0.0
    bandwidth: float = math.inf
    hidden_bytes: float = 1.0
    kv_bytes: float = 0.0
    h2d_latency: float = 0.0

    def act_bytes(self, tokens: int = 1) -> float:
        return tokens * self.hidden_bytes

    def alignment_bytes(self, positions: int, token: bool = True) -> float:
        return positions * self.kv_bytes

    def wire(self, nbytes: float) -> float:
        return nbytes / self.bandwidth

    def main(self, layer: int, tokens: int = 1, ctx: int = 0) -> float:
        return self.t_main * tokens

    def shared(self, tokens: int = 1) -> float:
        return self.t_shared * tokens

    def expert(self, experts: int = 1, tokens: int = 1, layer: int | None = None) -> float:
        return self.t_expert * experts * tokens

    def load(self, layer: int | None = None) -> float:
        return self.t_load

    def head(self, tokens: int = 1) -> float:
        return self.t_head

    def shadow(self, layer: int, ctx: int = 0, tokens: int = 1) -> float:
        return self.t_shadow * tokens

    def shadow_head(self) -> float:
        return self.t_shadow_head

    def cached_layer(self, layer: int, tokens: int = 1, ctx: int = 0, active: float | None = None) -> float:
        return self.t_cached * tokens

    def gpu_experts(self, experts: float, tokens: float = 1, fmt: str | None = None) -> float:
        return self.t_expert * experts * tokens

    def gpu_load(self, fmt: str | None = None) -> float:
        return self.t_load


MEASURED_COLUMNS = ("main_s", "expert_s", "shadow_s", "load_s", "hop_in_s", "hop_out_s")


class MeasuredCosts:
    """Measured decode-time durations (batch 1) per layer, with a model for everything else.

    ``table`` has one row per decoder layer (``layer``) and any of the columns ``main_s`` (M_l on the main node,
    excluding communication), ``expert_s`` (one worker's expert step, one expert), ``shadow_s`` (S_l) and
    ``load_s`` (one expert copy), ``hop_in_s`` / ``hop_out_s`` (decode: one-way time of the hidden vector to a
    worker / of an expert output back, beyond serialization); a row with ``layer = -1`` may give ``main_s`` for
    the LM head and ``shadow_s`` for the shadow's. ``latency`` (optional) replaces the model's per-message
    network time (every other message, and hops not measured). Prefill (tokens > 1) comes from ``base``, or
    with ``extrapolate`` from the measured one-token time plus the model's extra cost of the other tokens
    (``base(tokens) - base(1)``); anything not measured comes from ``base``.
    """

    def __init__(self, base, table: pd.DataFrame, latency: float | None = None, extrapolate: bool = False):
        self.base = base
        self.table = {
            c: dict(zip(table["layer"], table[c], strict=True)) for c in MEASURED_COLUMNS if c in table
        }
        self.latency = base.latency if latency is None else float(latency)
        self.h2d_latency = getattr(base, "h2d_latency", 0.0)
        self.extrapolate = extrapolate

    def _get(self, col: str, layer: int):
        v = self.table.get(col, {}).get(layer)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    def _mean(self, col: str) -> float | None:
        """Mean over the measured decoder layers (the LM head row, layer -1, excluded)."""
        vals = [float(v) for k, v in self.table.get(col, {}).items() if k >= 0 and not math.isnan(float(v))]
        return sum(vals) / len(vals) if vals else None

    def __getattr__(self, name):  # act_bytes, alignment_bytes, wire, shared, cached_layer, ...
        return getattr(self.base, name)

    def _per_tokens(self, col: str, layer: int, tokens: int, base) -> float:
        """The measured one-token time, for more tokens (with ``extrapolate``) plus the model's extra cost of
        the other tokens; ``base(tokens)`` where not measured."""
        v = self._get(col, layer) if tokens == 1 or self.extrapolate else None
        if v is None:
            return base(tokens)
        return v if tokens == 1 else v + base(tokens) - base(1)

    def main(self, layer: int, tokens: int = 1, ctx: int = 0) -> float:
        return self._per_tokens("main_s", layer, tokens, lambda t: self.base.main(layer, t, ctx))

    def expert(self, experts: int = 1, tokens: float = 1, layer: int | None = None) -> float:
        v = self._get("expert_s", layer) if layer is not None else self._mean("expert_s")
        if v is None or (tokens != 1 and not self.extrapolate):
            return self.base.expert(experts, tokens)
        extra = self.base.expert(experts, tokens) - self.base.expert(experts, 1) if tokens != 1 else 0.0
        return experts * v + extra

    def load(self, layer: int | None = None) -> float:
        v = self._get("load_s", layer) if layer is not None else self._mean("load_s")
        return self.base.load() if v is None else v

    def head(self, tokens: int = 1) -> float:
        v = self._get("main_s", -1) if tokens == 1 else None
        return self.base.head(tokens) if v is None else v

    def shadow(self, layer: int, ctx: int = 0, tokens: int = 1) -> float:
        return self._per_tokens("shadow_s", layer, tokens, lambda t: self.base.shadow(layer, ctx, t))

    def shadow_head(self) -> float:
        v = self._get("shadow_s", -1)
        return self.base.shadow_head() if v is None else v

    def hop(self, layer: int, direction: str) -> float:
        """One-way network time of a decode message at ``layer``: ``in`` (hidden vector), ``out`` (outputs)."""
        v = self._get("hop_in_s" if direction == "in" else "hop_out_s", layer)
        return self.latency if v is None else v


def load_measured(path: str | Path, base) -> MeasuredCosts:
    """Read a measured per-layer timing table (CSV or parquet; columns in :class:`MeasuredCosts`)."""
    path = Path(path)
    if not path.exists():
        raise OdmoeError(
            f"no measured timing table at {path}; pass a CSV with columns layer and any of main_s, expert_s, "
            "shadow_s, load_s (+exp=sim_measured exp.e2e_run=... derives one from a +exp=e2e run)"
        )
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if "layer" not in table or not any(c in table for c in MEASURED_COLUMNS):
        raise OdmoeError(f"{path}: needs a 'layer' column and at least one of {', '.join(MEASURED_COLUMNS)}")
    if (table[[c for c in MEASURED_COLUMNS if c in table]] < 0).any().any():
        raise OdmoeError(f"{path}: negative durations; times are seconds >= 0")
    return MeasuredCosts(base, table)


class Pricer:
    """Modelled compute of one executor's forward steps, layer by layer (``timing=modelled``).

    Executed decoder layer ``i`` is priced as layer ``i mod L`` of the priced shape (``L`` its depth), so an
    embedded model can run the real tokens, routing and predictions while the clock charges, say,
    Mixtral-8x7B's bytes and FLOPs per layer (``+exp=e2e`` scales reports to the shape's depth). ``kind`` says who computes a layer: ``main`` (attention,
    norms, router; shared experts are charged apart, after the dispatch), ``shadow`` (a whole quantized layer)
    or ``cached`` (a whole layer with its experts resident on one device).
    """

    def __init__(self, costs: ModelCosts, num_layers: int, kind: str = "main", dequant: str = "unfused"):
        if kind not in ("main", "shadow", "cached"):
            raise OdmoeError(f"unknown pricer kind {kind!r}")
        self.costs, self.num_layers, self.kind = costs, num_layers, kind
        self.fused = dequant == "fused"  # packed copies: the packed read alone (module docstring)
        self.tokens, self.ctx, self.next = 1, 0, 0
        self.attention_bytes: float | None = None  # stored bytes per attention weight when kept packed (HQQ)

    def begin(self, tokens: int, ctx: int) -> None:
        """A forward step over ``tokens`` new tokens after ``ctx`` cached positions."""
        self.tokens, self.ctx, self.next = tokens, ctx, 0

    def _one(self, layer: int) -> float:
        c, j = self.costs, layer % self.costs.shape.num_layers
        if self.kind == "shadow":
            return c.shadow(j, self.ctx, self.tokens)
        if self.kind == "cached":
            return c.cached_layer(j, self.tokens, self.ctx)
        t = c.main(j, self.tokens, self.ctx)
        if self.attention_bytes is not None:  # packed projections replace the resident ones main() priced
            a, flops = c.shape.attn_params, 2 * c.shape.attn_params * self.tokens
            dense = roofline(c.hw.main, a * FORMAT_BYTES[c.fmt.main], flops)
            t += self._packed(c.hw.main, a, a * self.attention_bytes, flops) - dense
        return t

    def _packed(self, dev: Device, params: float, packed_bytes: float, flops: float) -> float:
        """A matmul of ``flops`` over ``params`` weights stored in ``packed_bytes``: unfused, they are first
        dequantized (read packed, ``DEQUANT_FLOPS`` per weight, write the compute format) and the matmul reads
        the result; fused, the packed read alone."""
        if self.fused:
            return roofline(dev, packed_bytes, flops)
        unpacked = params * FORMAT_BYTES[self.costs.fmt.main]
        return roofline(dev, packed_bytes + 2 * unpacked, flops + DEQUANT_FLOPS * params)

    def upto(self, layer: int) -> float:
        """Every layer not yet priced, up to and including ``layer``."""
        t = sum(self._one(i) for i in range(self.next, layer + 1))
        self.next = max(self.next, layer + 1)
        return t

    def finish(self) -> float:
        """The layers after the last MoE layer and the LM head (one position's logits)."""
        head = self.costs.shadow_head() if self.kind == "shadow" else self.costs.head(1)
        return self.upto(self.num_layers - 1) + head

    def shared(self) -> float:
        """The shared experts of one MoE layer on the main node (0 for shapes without them)."""
        return self.costs.shared(self.tokens)

    def expert(
        self,
        tokens: int,
        first: bool = True,
        nbytes: float | None = None,
        on: str = "worker",
        packed: bool = False,
    ) -> float:
        """One expert over ``tokens`` rows reading ``nbytes`` of weights (default: a worker expert at the
        workers' format), on a worker or (``on="device"``) on an offload engine's single device; the per-call
        overhead is paid by a call's first expert. ``packed``: the ``nbytes`` are a packed copy (priced by
        ``timing.dequant``, module docstring)."""
        c = self.costs
        dev = c.hw.worker if on == "worker" else c.hw.main
        params, flops = c.shape.expert_params, 2 * c.shape.expert_params * tokens
        nbytes = c.expert_bytes() if nbytes is None else nbytes
        t = self._packed(dev, params, nbytes, flops) if packed else roofline(dev, nbytes, flops)
        return t + (c.expert_overhead if first else 0.0)


def run_costs(timing, hw: HardwareProfile, config, formats: Formats | None = None) -> ModelCosts | None:
    """The cost model of a run under ``timing=modelled`` (None otherwise): ``timing.shape`` if set, else the
    executed model's own shape (from its transformers config)."""
    if getattr(timing, "mode", timing) != "modelled":
        return None
    from odmoe.sim.shapes import load_shape, shape_from_config

    shape = load_shape(timing.shape) if timing.shape else shape_from_config(config)
    return ModelCosts(shape, hw, formats)
