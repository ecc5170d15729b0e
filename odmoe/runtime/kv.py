"""KV cache rows between ranks: the main node's alignment payload, the shadow's overwrite, cache bytes.

A cache layer's keys and values need not share a shape: multi-head latent attention (DeepSeek-V2/V3)
caches one compressed latent as "keys" [1, 1, S, kv_lora_rank] and one rotary key as "values"
[1, 1, S, qk_rope_head_dim]. So rows travel as one flat tensor, each layer's key rows then value rows, and
the receiver cuts it by its own cache's shapes (same model, so the same shapes; the dtype is cast).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from odmoe.errors import OdmoeError


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes held by a cache's keys and values (each counted at its own size)."""
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        if layer.keys is not None
        for t in (layer.keys, layer.values)
    )


def pack_rows(cache: DynamicCache, start: int, count: int) -> torch.Tensor:
    """Positions ``start .. start + count - 1`` of every layer's keys and values (batch row 0), flat."""
    parts = []
    for layer in cache.layers:
        parts.append(layer.keys[0, :, start : start + count].reshape(-1))
        parts.append(layer.values[0, :, start : start + count].reshape(-1))
    return torch.cat(parts)


def unpack_rows(cache: DynamicCache, payload: torch.Tensor, start: int, count: int) -> None:
    """Overwrite positions ``start .. start + count - 1`` of every layer with ``pack_rows``' payload, cast to
    the cache's dtype and device."""
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    if any(t.shape[-2] < start + count for t in tensors):
        raise OdmoeError(
            "KV alignment needs a full (non-sliding-window) cache; this model's cache is shorter"
        )
    need = sum(t[0, :, start : start + count].numel() for t in tensors)
    if need != payload.numel():
        raise OdmoeError(
            f"a KV alignment payload of {payload.numel()} values does not fit {count} positions of this "
            f"model's cache ({need} values); main node and shadow must run the same model"
        )
    offset = 0
    for t in tensors:
        rows = t[0, :, start : start + count]
        rows.copy_(payload[offset : offset + rows.numel()].view(rows.shape))
        offset += rows.numel()
