"""The SEP shadow: a lower-precision copy of the whole model whose routing is the prediction.

``build_shadow(model, precision)`` copies the full model without ever holding a second copy of its
routed experts in full precision (they are converted or quantized expert by expert), so it also
works for a large model beside its fp32 original on one GPU.

Precisions (PAPER.md §4.5, §11 item 3):

=========  ========================================================================================
``fp32``   an exact copy (expert tensors shared with the full model). A sanity check, not a
           paper configuration: with alignment its recall must be exactly 1.
``fp16``   every weight, activation and KV entry in fp16 (the paper's FP16 shadow).
``int8``   bitsandbytes LLM.int8() for the routed experts and all decoder-layer linears; fp16
           compute, embeddings, norms, routers and LM head (see ``quantize.py``).
``nf4``    bitsandbytes NF4 (block 64, fp32 absmax, no double quantization) likewise.
=========  ========================================================================================

The shadow's KV cache is in its compute dtype (fp16, or fp32 for the fp32 copy); KV sent by the full
model is cast to it on receipt (PAPER.md §11 item 4).

The shadow's routing is captured through the adapter's expert hook, which is also where its
quantized experts run, so the routing recorded is exactly the routing the shadow computed with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from odmoe.errors import OdmoeError
from odmoe.models.adapter import MoEAdapter, eager_experts_forward
from odmoe.predict.quantize import (
    DEFAULT_INT8_THRESHOLD,
    QUANTIZED,
    QuantizedExperts,
    quantize_linear,
    quantized_linear_bytes,
    require_bitsandbytes,
)

PRECISIONS = ("fp32", "fp16", "int8", "nf4")
COMPUTE_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float16, "nf4": torch.float16}


def check_precision(precision: str) -> str:
    """``precision`` if it is a supported shadow precision, else a clear error."""
    if precision not in PRECISIONS:
        raise OdmoeError(
            f"unknown shadow precision {precision!r}; use one of {', '.join(PRECISIONS)} "
            "(the paper's shadows are fp16, int8 and nf4)"
        )
    return precision


def _component(name: str) -> str:
    """Byte-report category of a module path."""
    if ".mlp.experts" in name:
        return "routed_experts"
    if name.endswith(".mlp.gate") or ".mlp.gate." in name:
        return "routers"
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if "norm" in name.rsplit(".", 1)[-1]:
        return "norms"
    if name.startswith("model.layers."):
        return "layer_linears"  # attention projections, shared experts, dense MLPs
    return "other"


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of a model's weights by component, quantized data and scales included.

    Components: ``routed_experts``, ``layer_linears`` (attention, shared experts, dense MLPs),
    ``embeddings``, ``lm_head``, ``routers``, ``norms``, ``other``, and ``total``. Tied tensors are
    counted once; non-persistent buffers (rotary tables) are not weights and are left out.
    """
    out = dict.fromkeys(
        ("routed_experts", "layer_linears", "embeddings", "lm_head", "routers", "norms", "other"), 0
    )
    seen: set[int] = set()

    def add(category: str, tensor: torch.Tensor) -> None:
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        key = (key, tensor.storage_offset(), tensor.numel())
        if key in seen:
            return
        seen.add(key)
        out[category] += tensor.numel() * tensor.element_size()

    for name, module in model.named_modules():
        category = _component(name)
        qbytes = quantized_linear_bytes(module) if category == "layer_linears" else None
        if qbytes is not None:
            out[category] += qbytes
            continue
        for p in module.parameters(recurse=False):
            add(category, p)
        for bname, b in module.named_buffers(recurse=False):
            if bname in module._non_persistent_buffers_set:
                continue
            add(category, b)
    out["total"] = sum(out.values())
    return out


@dataclass
class Shadow:
    """A shadow model, its adapter, and the routing it computed since the last ``pop_routing``."""

    model: nn.Module
    adapter: MoEAdapter
    precision: str
    dtype: torch.dtype

    def __post_init__(self) -> None:
        self._calls: dict[int, list[torch.Tensor]] = {}
        self.capturing = True  # set False when routing is read elsewhere (nothing accumulates then)
        for layer in self.adapter.moe_layers:
            self.adapter.set_experts_forward(layer, self._capture(layer, self.experts_compute(layer)))

    def experts_compute(self, layer: int):
        """The shadow's own routed-expert computation of ``layer`` (quantized or eager), uncaptured."""
        quantized = getattr(self.adapter.experts(layer), "odmoe_quantized", None)
        return quantized if quantized is not None else eager_experts_forward

    def _capture(self, layer: int, compute):
        def forward(module, hidden, top_k_index, top_k_weights):
            if self.capturing:
                self._calls.setdefault(layer, []).append(top_k_index.detach())
            return compute(module, hidden, top_k_index, top_k_weights)

        return forward

    def pop_routing(self) -> np.ndarray:
        """Experts each MoE layer chose in the forward passes since the last pop: [T, Lm, k]."""
        layers = self.adapter.moe_layers
        out = torch.stack([torch.cat(self._calls[layer]) for layer in layers], dim=1)
        self._calls = {}
        return out.cpu().numpy()

    def weight_bytes(self) -> dict[str, int]:
        return weight_bytes(self.model)


def _expert_params(adapter: MoEAdapter) -> list[nn.Parameter]:
    return [
        p
        for layer in adapter.moe_layers
        for p in (adapter.experts(layer).gate_up_proj, adapter.experts(layer).down_proj)
    ]


def build_shadow(
    model: nn.Module,
    adapter: MoEAdapter,
    precision: str,
    int8_threshold: float = DEFAULT_INT8_THRESHOLD,
) -> Shadow:
    """A shadow of ``model`` at ``precision``, on the model's device, in eval mode."""
    check_precision(precision)
    device = next(model.parameters()).device
    if precision in QUANTIZED:
        require_bitsandbytes(precision, device)
    dtype = COMPUTE_DTYPE[precision]
    originals = {layer: adapter.experts(layer) for layer in adapter.moe_layers}
    # Copy everything but the routed experts (each replaced by an empty placeholder in the copy).
    memo = {
        id(p): nn.Parameter(torch.empty(0, device=device), requires_grad=False)
        for p in _expert_params(adapter)
    }
    shadow = copy.deepcopy(model, memo)
    shadow.to(dtype)
    shadow_adapter = MoEAdapter(shadow)
    for layer, original in originals.items():
        experts = shadow_adapter.experts(layer)
        if precision == "fp32":
            experts.gate_up_proj, experts.down_proj = original.gate_up_proj, original.down_proj
        elif precision == "fp16":
            experts.gate_up_proj = nn.Parameter(original.gate_up_proj.detach().to(dtype), requires_grad=False)
            experts.down_proj = nn.Parameter(original.down_proj.detach().to(dtype), requires_grad=False)
        else:
            del experts.gate_up_proj, experts.down_proj  # the eager loop can no longer run by mistake
            experts.odmoe_quantized = QuantizedExperts(
                original.gate_up_proj, original.down_proj, experts.act_fn, precision, int8_threshold
            )
    if precision in QUANTIZED:
        routers = {id(shadow_adapter.router(layer)) for layer in shadow_adapter.moe_layers}
        for module in list(shadow.model.layers.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and id(child) not in routers:
                    setattr(module, child_name, quantize_linear(child, precision, int8_threshold))
    shadow.eval()
    shadow.requires_grad_(False)
    return Shadow(shadow, shadow_adapter, precision, dtype)
