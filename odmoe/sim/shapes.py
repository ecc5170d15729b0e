"""Model shapes from a Hugging Face config alone (no weights): what the simulator needs to price a model.

``load_shape(name_or_path)`` accepts a file in ``conf/sim_models/`` (``mixtral-8x7b``, ``qwen3-30b-a3b``…), a
``config.json`` path, or any local checkpoint directory holding one. The config is rebuilt with
``transformers.AutoConfig.for_model(model_type, **fields)`` so every attribute falls back to the library's
defaults and the attribute aliases of each family (``num_experts`` / ``num_local_experts`` /
``n_routed_experts``) resolve the same way as in the model code.

Counted, per family: routed experts (SwiGLU, three H x F matrices), shared experts (always active: they belong
to the main node), dense layers (DeepSeek's first layers, Qwen's ``mlp_only_layers``), attention weights (GQA or
DeepSeek's MLA), and the KV entries one token adds per layer (MLA caches the compressed latent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from odmoe.errors import OdmoeError
from odmoe.paths import repo_root

SIM_MODELS_DIR = repo_root() / "conf" / "sim_models"

# Bytes per parameter by storage format; int8 adds one fp32 scale per output row, nf4 one fp32 absmax per
# 64 values (bitsandbytes' defaults), as odmoe.models.adapter.expert_bytes does.
FORMAT_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "nf4": 0.5}


@dataclass(frozen=True)
class ModelShape:
    """Sizes of one MoE decoder; parameter counts, not bytes (bytes depend on the format chosen)."""

    name: str
    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    hidden: int
    expert_ffn: int  # intermediate size of one routed expert
    num_experts: int
    top_k: int
    shared_ffn: int  # summed intermediate size of the shared experts (0: none)
    dense_ffn: int  # intermediate size of the dense (non-MoE) layers
    vocab: int
    attn_params: int  # attention weights of one layer (projections only)
    kv_per_token: int  # KV values one token adds to one layer's cache
    attn_flops_per_token_ctx: int  # attention score + value FLOPs per (query token, cached position)
    tie_embeddings: bool = False

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.expert_ffn

    def expert_bytes(self, fmt: str = "fp32") -> int:
        """Bytes of one routed expert stored as ``fmt`` (scales included)."""
        if fmt not in FORMAT_BYTES:
            raise OdmoeError(f"unknown expert format {fmt!r}; use one of {', '.join(FORMAT_BYTES)}")
        n = self.expert_params
        scales = {"int8": 4 * (2 * self.expert_ffn + self.hidden), "nf4": 4 * (n // 64)}.get(fmt, 0)
        return int(n * FORMAT_BYTES[fmt]) + scales

    @property
    def shared_params(self) -> int:
        """Shared-expert weights of one MoE layer (incl. Qwen2-MoE's shared-expert gate)."""
        if not self.shared_ffn:
            return 0
        return 3 * self.hidden * self.shared_ffn + (self.hidden if self.model_type == "qwen2_moe" else 0)

    @property
    def router_params(self) -> int:
        return self.hidden * self.num_experts

    def layer_nonexpert_params(self, layer: int) -> int:
        """Everything in decoder layer ``layer`` except routed experts: attention, norms, router, shared or dense FFN."""
        p = self.attn_params + 2 * self.hidden
        if layer in self.moe_layers:
            return p + self.router_params + self.shared_params
        return p + 3 * self.hidden * self.dense_ffn

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def nonexpert_params(self) -> int:
        embed = self.vocab * self.hidden
        head = 0 if self.tie_embeddings else self.head_params
        return (
            embed + head + self.hidden + sum(self.layer_nonexpert_params(i) for i in range(self.num_layers))
        )

    @property
    def total_params(self) -> int:
        return self.nonexpert_params + self.num_moe_layers * self.num_experts * self.expert_params

    def kv_bytes_per_token(self, fmt: str = "fp32") -> int:
        """KV entries one position adds over all layers (the KV-alignment payload of one token)."""
        return int(self.num_layers * self.kv_per_token * FORMAT_BYTES[fmt])


def _attr(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def shape_from_config(cfg, name: str | None = None) -> ModelShape:
    """A :class:`ModelShape` from a ``transformers`` config object of a supported MoE family."""
    mt = cfg.model_type
    h = int(cfg.hidden_size)
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(_attr(cfg, "num_key_value_heads", default=heads))
    num_experts = int(_attr(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0))
    top_k = int(_attr(cfg, "num_experts_per_tok", default=0))
    if not num_experts or not top_k:
        raise OdmoeError(
            f"{name or mt}: config has no routed experts (num_experts / num_experts_per_tok); not an MoE"
        )
    dense_ffn = int(cfg.intermediate_size)
    shared_ffn = 0
    if mt == "mixtral":
        expert_ffn, moe = dense_ffn, list(range(layers))
    elif mt == "olmoe":
        expert_ffn, moe = dense_ffn, list(range(layers))
    elif mt in ("qwen2_moe", "qwen3_moe"):
        expert_ffn = int(cfg.moe_intermediate_size)
        step = int(_attr(cfg, "decoder_sparse_step", default=1))
        only = set(_attr(cfg, "mlp_only_layers", default=[]) or [])
        moe = [i for i in range(layers) if i not in only and (i + 1) % step == 0]
        if mt == "qwen2_moe":
            shared_ffn = int(_attr(cfg, "shared_expert_intermediate_size", default=0))
    elif mt in ("deepseek_v2", "deepseek_v3"):
        expert_ffn = int(cfg.moe_intermediate_size)
        first = int(_attr(cfg, "first_k_dense_replace", default=0))
        freq = int(_attr(cfg, "moe_layer_freq", default=1))
        moe = [i for i in range(layers) if i >= first and i % freq == 0]
        shared_ffn = int(_attr(cfg, "n_shared_experts", default=0) or 0) * expert_ffn
    else:
        raise OdmoeError(
            f"{name or mt}: model type {mt!r} is not supported by the simulator; "
            "supported: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3"
        )
    if mt.startswith("deepseek"):  # multi-head latent attention
        q_rank = _attr(cfg, "q_lora_rank")
        rope, nope, v = int(cfg.qk_rope_head_dim), int(cfg.qk_nope_head_dim), int(cfg.v_head_dim)
        kv_rank = int(cfg.kv_lora_rank)
        qk = rope + nope
        q = h * heads * qk if not q_rank else h * int(q_rank) + int(q_rank) * heads * qk
        attn = q + h * (kv_rank + rope) + kv_rank * heads * (nope + v) + heads * v * h
        kv_per_token = kv_rank + rope
        attn_ctx_flops = 2 * heads * (qk + v)
    else:
        hd = int(_attr(cfg, "head_dim", default=h // heads))
        attn = h * heads * hd * 2 + h * kv_heads * hd * 2
        kv_per_token = 2 * kv_heads * hd
        attn_ctx_flops = 4 * heads * hd
    return ModelShape(
        name=name or getattr(cfg, "_name_or_path", "") or mt,
        model_type=mt,
        num_layers=layers,
        moe_layers=tuple(moe),
        hidden=h,
        expert_ffn=expert_ffn,
        num_experts=num_experts,
        top_k=top_k,
        shared_ffn=shared_ffn,
        dense_ffn=dense_ffn,
        vocab=int(cfg.vocab_size),
        attn_params=int(attn),
        kv_per_token=int(kv_per_token),
        attn_flops_per_token_ctx=int(attn_ctx_flops),
        tie_embeddings=bool(_attr(cfg, "tie_word_embeddings", default=False)),
    )


def sim_model_names() -> list[str]:
    return sorted(p.stem for p in SIM_MODELS_DIR.glob("*.json"))


def _config_file(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        return p / "config.json"
    if p.is_file():
        return p
    shipped = SIM_MODELS_DIR / f"{name_or_path}.json"
    if shipped.exists():
        return shipped
    raise OdmoeError(
        f"no model shape {name_or_path!r}: not a shipped shape ({', '.join(sim_model_names())}), "
        "a config.json, or a checkpoint directory containing one"
    )


def load_shape(name_or_path: str) -> ModelShape:
    """The shape of a shipped model name, a ``config.json`` path, or a checkpoint directory."""
    from transformers import AutoConfig

    path = _config_file(name_or_path)
    fields = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise OdmoeError(f"{path} has no model_type; it is not a Hugging Face config.json")
    fields.pop("architectures", None)
    try:
        cfg = AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError) as e:
        raise OdmoeError(f"{path}: transformers cannot build a {model_type!r} config ({e})") from None
    name = (
        path.stem
        if path.parent == SIM_MODELS_DIR
        else str(path.parent if path.name == "config.json" else path)
    )
    return shape_from_config(cfg, name=name)
