"""Analytic device-memory model of OD-MoE and of the fully cached model, from a model config alone.

Parameters are counted exactly by instantiating the architecture on the ``meta`` device (no
weights, no memory), so the same code prices the embedded model and Mixtral-8x7B
(``conf/sim_models/mixtral-8x7b.json``). Per node:

* main:   every non-expert weight (attention, norms, routers, embeddings, LM head, shared experts)
          in the main dtype + its KV cache + activations;
* shadow: the whole model at the shadow precision (int8 / nf4 with bitsandbytes' scales, fp16
          embeddings, norms, routers and LM head, as ``odmoe.predict`` builds it) + its KV cache in the
          shadow's compute dtype + activations (its experts run locally);
* worker: ``slots`` expert buffers + the activations of the rows one expert computes;
* cached: every weight + KV + activations on one (virtual) device.

Activations are the tensors one layer step materializes, counted with the same functions the
runtime's ledgers use (``main_activation_bytes``, ``worker_activation_bytes``): for T tokens over a
context of S positions, the residual, the normed input, q/k/v, attention scores and probabilities
[heads, T, S], the attention output, the k expert outputs, the combined output and the last
position's logits. So the model and the ledgers agree on activations by construction; what the
comparison tests is that weights, expert slots and KV caches measured from the real tensors match the
config's arithmetic (a main node that kept its experts, a worker with a second buffer, a KV cache of
the wrong width would all show).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from odmoe.paths import repo_root
from odmoe.sim.shapes import shape_from_config as model_shape

BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "nf4": 0.5}
NF4_BLOCK = 64


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    moe_layers: int
    experts: int
    top_k: int
    expert_ff: int
    heads: int
    kv_heads: int
    head_dim: int
    kv_per_layer: int  # KV values one position adds to one layer's cache (MLA: its latent + rotary key)
    vocab: int
    non_expert_params: int
    expert_params: int  # one routed expert
    linear_shapes: tuple[tuple[int, int, bool], ...]  # (out, in, bias) of every nn.Linear in the layers
    other_params: int  # non-expert parameters outside those linears (embeddings, norms, routers, head)

    @property
    def kv_per_position(self) -> int:
        """KV values (not bytes) one position adds over all layers."""
        return self.layers * self.kv_per_layer

    def expert_bytes(self, fmt: str) -> float:
        n = self.expert_params
        if fmt == "int8":
            return n + 4 * (2 * self.expert_ff + self.hidden)
        if fmt == "nf4":
            return n / 2 + 4 * n / NF4_BLOCK
        return n * BYTES[fmt]


def shape_from_config(config) -> Shape:
    """Exact parameter counts of an HF MoE config (a ``PretrainedConfig``), on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expert_params, non_expert, moe_layers = 0, 0, 0
    experts = top_k = ff = 0
    for layer in model.model.layers:
        ex = getattr(layer.mlp, "experts", None)
        if ex is not None and hasattr(ex, "gate_up_proj"):
            moe_layers += 1
            experts = ex.gate_up_proj.shape[0]
            ff = ex.gate_up_proj.shape[1] // 2
            expert_params = (ex.gate_up_proj.numel() + ex.down_proj.numel()) // experts
            top_k = layer.mlp.gate.top_k
    seen = set()
    linears = []
    linear_params = 0
    for name, p in model.named_parameters():
        if ".mlp.experts." in name or id(p) in seen:
            continue
        seen.add(id(p))
        non_expert += p.numel()
    for name, m in model.model.layers.named_modules():
        if isinstance(m, nn.Linear) and ".experts" not in name:
            linears.append((m.out_features, m.in_features, m.bias is not None))
            linear_params += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
    c = config
    heads = c.num_attention_heads
    return Shape(
        hidden=c.hidden_size,
        layers=c.num_hidden_layers,
        moe_layers=moe_layers,
        experts=experts,
        top_k=top_k,
        expert_ff=ff,
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", heads),
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        kv_per_layer=model_shape(c).kv_per_token,
        vocab=c.vocab_size,
        non_expert_params=non_expert,
        expert_params=expert_params,
        linear_shapes=tuple(linears),
        other_params=non_expert - linear_params,
    )


def config_from_json(path: str | Path):
    """A transformers config from a shape-only json (``conf/sim_models/*.json``)."""
    from transformers import AutoConfig

    raw = {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}
    model_type = raw.pop("model_type")
    raw.pop("architectures", None)
    return AutoConfig.for_model(model_type, **raw)


def sim_model_config(name: str):
    return config_from_json(repo_root() / "conf" / "sim_models" / f"{name}.json")


# ---- activations (shared with the runtime's ledgers) ------------------------------------------
def main_activation_bytes(shape: Shape, tokens: int, context: int, elem: int = 4) -> int:
    t, h = tokens, shape.hidden
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    values = (
        4 * t * h + t * (q + 2 * kv) + 2 * shape.heads * t * context + t * q + shape.top_k * t * h + t * h
    )
    return int(elem * (values + shape.vocab))


def worker_activation_bytes(rows: int, hidden: int, ff: int, elem: int = 4) -> int:
    """x [rows, H], gate/up [rows, 2F], act(gate) * up [rows, F], y [rows, H]."""
    return int(elem * rows * (2 * hidden + 3 * ff))


def kv_bytes(shape: Shape, positions: int, elem: float = 4) -> int:
    return int(shape.kv_per_position * positions * elem)


# ---- weights ---------------------------------------------------------------------------------
def shadow_weight_bytes(shape: Shape, precision: str) -> int:
    """The shadow as ``odmoe.predict.shadow.build_shadow`` builds it."""
    experts = shape.moe_layers * shape.experts * shape.expert_bytes(precision)
    if precision in ("fp32", "fp16", "bf16"):
        return int(experts + shape.non_expert_params * BYTES[precision])
    linears = 0.0
    for out, inp, bias in shape.linear_shapes:
        n = out * inp
        linears += n + 4 * out if precision == "int8" else n / 2 + 4 * n / NF4_BLOCK
        linears += 2 * out if bias else 0
    return int(experts + linears + 2 * shape.other_params)


# ---- the model -------------------------------------------------------------------------------
def memory_model(
    shape: Shape,
    workers: int,
    prompt_len: int,
    output_len: int,
    slots: int = 1,
    shadow_precision: str = "int8",
    main_dtype: str = "fp32",
    expert_dtype: str = "fp32",
    prefill_rows: int | None = None,
) -> dict[str, float]:
    """Peak bytes per node in the decode phase (and the prefill-phase bound) of one request.

    Decode: T = 1 and the longest context S = P + O - 1. Prefill: T = S = P, and a worker computes
    at most ``prefill_rows`` rows at once (default: the worst case, every token in one mini-batch).
    """
    eb = BYTES[main_dtype]
    sb = 4 if shadow_precision == "fp32" else 2
    s_end = prompt_len + output_len - 1
    p = prompt_len
    f, h = shape.expert_ff, shape.hidden
    main_w = shape.non_expert_params * eb
    main_dec = main_w + kv_bytes(shape, s_end, eb) + main_activation_bytes(shape, 1, s_end, eb)
    main_pre = main_w + kv_bytes(shape, p, eb) + main_activation_bytes(shape, p, p, eb)
    shadow_w = shadow_weight_bytes(shape, shadow_precision)
    shadow_act = lambda t, s: main_activation_bytes(shape, t, s, sb) + worker_activation_bytes(t, h, f, sb)  # noqa: E731
    shadow_dec = shadow_w + kv_bytes(shape, s_end, sb) + shadow_act(1, s_end)
    shadow_pre = shadow_w + kv_bytes(shape, p, sb) + shadow_act(p, p)
    slot_bytes = slots * shape.expert_bytes(expert_dtype)
    worker_dec = slot_bytes + worker_activation_bytes(1, h, f, BYTES[expert_dtype])
    rows = p if prefill_rows is None else prefill_rows
    worker_pre = slot_bytes + worker_activation_bytes(rows, h, f, BYTES[expert_dtype])
    all_w = (shape.non_expert_params + shape.moe_layers * shape.experts * shape.expert_params) * eb
    cached_dec = (
        all_w
        + kv_bytes(shape, s_end, eb)
        + main_activation_bytes(shape, 1, s_end, eb)
        + worker_activation_bytes(1, h, f, eb)
    )
    return {
        "main": main_dec,
        "shadow": shadow_dec,
        "worker": worker_dec,
        "total": main_dec + shadow_dec + workers * worker_dec,
        "cached": cached_dec,
        "main_weights": main_w,
        "shadow_weights": shadow_w,
        "worker_slots": slot_bytes,
        "main_prefill": main_pre,
        "shadow_prefill": shadow_pre,
        "worker_prefill": worker_pre,
        "expert_bytes": shape.expert_bytes(expert_dtype),
    }


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
