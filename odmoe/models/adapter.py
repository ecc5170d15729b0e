"""One view over every supported Hugging Face MoE causal LM.

Transformers 5 stores the routed experts of a layer fused, as two 3-D tensors
(``gate_up_proj`` [E, 2F, H] and ``down_proj`` [E, H, F]), and dispatches their computation through
``transformers.integrations.moe.ExpertsInterface``. We register one implementation there,
``"odmoe"``, which runs a per-module override when one is installed and the stock eager loop
otherwise. That is the single hook through which traces are recorded, shadows run quantized
experts and the runtime sends expert work to workers, without copying modeling code.

Shared experts (Qwen2-MoE, DeepSeek) and dense layers (DeepSeek's first layers) stay where the model
puts them: they are non-expert weights and are computed by whoever holds the layer's attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from odmoe.errors import OdmoeError
from odmoe.models import rowexact

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")

# fn(experts_module, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]
ExpertsForward = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Bytes per expert parameter by storage format. int8 keeps one fp32 scale per output row and nf4
# one fp32 absmax per 64-value block (bitsandbytes' defaults); see ``expert_bytes``.
DTYPE_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "nf4": 0.5}
NF4_BLOCKSIZE = 64


def eager_experts_forward(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The model's own eager expert loop (the reference computation); in a row-exact forward
    (``odmoe.models.rowexact``) one token at a time, as a batch-1 decode step runs it."""
    forward = type(module).forward.__wrapped__
    if rowexact.must_split(hidden_states):
        return torch.cat(
            [
                forward(module, hidden_states[i : i + 1], top_k_index[i : i + 1], top_k_weights[i : i + 1])
                for i in range(hidden_states.shape[0])
            ]
        )
    return forward(module, hidden_states, top_k_index, top_k_weights)


def _odmoe_experts_forward(module, hidden_states, top_k_index, top_k_weights):
    override = getattr(module, "odmoe_forward", None)
    fn = override if override is not None else eager_experts_forward
    return fn(module, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register("odmoe", _odmoe_experts_forward)


def swiglu_expert(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """One expert on tokens ``x`` [T, H] with ``gate_up`` [2F, H] and ``down`` [H, F] (HF layout)."""
    gate, up = nn.functional.linear(x, gate_up).chunk(2, dim=-1)
    return nn.functional.linear(act(gate) * up, down)


@dataclass(frozen=True)
class ExpertWeights:
    """Views of one routed expert in the HF ``[out, in]`` layout: ``gate_up`` [2F, H], ``down`` [H, F]."""

    gate_up: torch.Tensor
    down: torch.Tensor

    @property
    def numel(self) -> int:
        return self.gate_up.numel() + self.down.numel()


class MoEAdapter:
    """Layers, routers, experts and the expert hook of one loaded MoE causal LM."""

    def __init__(self, model: nn.Module):
        config = model.config
        model_type = getattr(config, "model_type", "?")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise OdmoeError(
                f"model type {model_type!r} is not a supported MoE; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.model = model
        self.config = config
        self.model_type = model_type
        self.layers: nn.ModuleList = model.model.layers
        self.moe_layers: list[int] = [
            i for i, layer in enumerate(self.layers) if hasattr(layer.mlp, "experts")
        ]
        if not self.moe_layers:
            raise OdmoeError(f"{model_type} model has no MoE layers; load an MoE checkpoint")
        first = self.experts(self.moe_layers[0])
        if getattr(first, "is_transposed", False) or not getattr(first, "is_concatenated", True):
            raise OdmoeError(
                f"{model_type}: only the concatenated, untransposed fused-expert layout is supported"
            )
        self.num_experts: int = first.num_experts
        self.top_k: int = self.router(self.moe_layers[0]).top_k
        self.hidden_size: int = config.hidden_size
        self.expert_intermediate_size: int = first.intermediate_dim
        model.set_experts_implementation("odmoe")

    # ---- structure -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def num_shared_experts(self) -> int:
        mlp = self.layers[self.moe_layers[0]].mlp
        if hasattr(mlp, "shared_expert"):
            return 1
        if hasattr(mlp, "shared_experts"):
            return int(getattr(self.config, "n_shared_experts", 1))
        return 0

    def block(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp

    def router(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp.gate

    def experts(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp.experts

    def route(self, layer: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply layer ``layer``'s router to post-attention-norm states: (top-k weights, top-k indices)."""
        _, weights, indices = self.router(layer)(hidden_states)
        return weights, indices

    # ---- expert weights --------------------------------------------------------------------
    def expert_weights(self, layer: int, expert: int) -> ExpertWeights:
        experts = self.experts(layer)
        return ExpertWeights(experts.gate_up_proj[expert], experts.down_proj[expert])

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (SwiGLU: three H x F matrices)."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    def expert_bytes(self, fmt: str = "fp32") -> int:
        """Bytes of one routed expert stored as ``fmt`` (fp32, fp16, bf16, int8, nf4), scales included."""
        if fmt not in DTYPE_BYTES:
            raise OdmoeError(f"unknown expert format {fmt!r}; use one of {', '.join(DTYPE_BYTES)}")
        h, f = self.hidden_size, self.expert_intermediate_size
        n = self.expert_params
        scales = {"int8": 4 * (2 * f + h), "nf4": 4 * (n // NF4_BLOCKSIZE)}.get(fmt, 0)
        return int(n * DTYPE_BYTES[fmt]) + scales

    def parameter_bytes(self) -> dict[str, int]:
        """Bytes of routed-expert and of all other parameters, as stored now."""
        expert_ids = {id(self.experts(i).gate_up_proj) for i in self.moe_layers}
        expert_ids |= {id(self.experts(i).down_proj) for i in self.moe_layers}
        out = {"experts": 0, "non_experts": 0}
        for p in self.model.parameters():
            out["experts" if id(p) in expert_ids else "non_experts"] += p.numel() * p.element_size()
        return out

    # ---- the hook --------------------------------------------------------------------------
    def set_experts_forward(self, layer: int, fn: ExpertsForward | None) -> None:
        """Replace (or with ``None`` restore) the routed-expert computation of one MoE layer."""
        if layer not in self.moe_layers:
            raise OdmoeError(f"layer {layer} is not an MoE layer (MoE layers: {self.moe_layers})")
        self.experts(layer).odmoe_forward = fn

    def clear_experts_forward(self) -> None:
        for layer in self.moe_layers:
            self.experts(layer).odmoe_forward = None
