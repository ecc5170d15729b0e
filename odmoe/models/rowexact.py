"""Row-exact forwards: every token's numbers independent of the batch it is computed in.

A batched kernel rounds differently from a batch-1 one (on CPU a one-row product is a GEMV, a
many-row one a GEMM; LLM.int8() picks its fp16 outlier columns over all rows of a call). Where a
model feeds itself its own tokens, one flipped near-tie sends two replays down different texts, so
a batched replay is only the same run as the batch-1 reference if each row's arithmetic is the
batch-1 arithmetic. Inside ``row_exact(model, adapter)`` every linear and router that gets more than
one row computes each ``F.linear`` one row at a time (shaped as at batch 1), routed experts run one
token at a time (``odmoe.models.adapter.eager_experts_forward``), and the shadows' quantized
linears and experts split a call into rows where bitsandbytes would not keep them apart
(``odmoe.predict.quantize``). A batch-1 decode step gives each of them one row, so it runs
untouched. The rest of a decoder layer (norms, rotary embedding, routing softmax and top-k,
attention over unpadded rows) is row-wise already; ``tests/test_sep_fast.py`` checks whole replays
bit for bit on both micro models.

The price is one small product per row instead of one per call, so a batch still saves every
Python-level module call, but not the products themselves; a prompt's prefill (its tokens as rows)
pays it too, in the batch-1 reference as in the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_depth = 0  # row_exact blocks entered and not left


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() >= 2 and x.shape[-1] else 1


def must_split(x: torch.Tensor) -> bool:
    """Whether a module that keeps rows apart itself (``keeps_rows_apart``) must compute ``x`` one row
    at a time now: inside ``row_exact``, with more than one row."""
    return _depth > 0 and _rows(x) > 1


def split_rows(fn, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``fn(x, ...)`` one row of ``x`` at a time, each row with ``x``'s rank (leading sizes 1)."""
    flat = x.reshape(-1, x.shape[-1])
    ones = (1,) * (x.dim() - 1)
    out = [fn(flat[i].reshape(*ones, -1), *args, **kwargs) for i in range(flat.shape[0])]
    return torch.cat([o.reshape(1, -1) for o in out]).reshape(*x.shape[:-1], -1)


class RowExact(TorchFunctionMode):
    """``F.linear`` of a many-row input as one batch-1 ``F.linear`` per row."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.linear and _rows(args[0]) > 1:
            return split_rows(func, *args, **kwargs)
        return func(*args, **kwargs)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


@contextmanager
def row_exact(model: nn.Module, adapter) -> Iterator[None]:
    """Within the block, every ``nn.Linear`` and router of ``model`` that gets more than one row runs
    under ``RowExact``, except modules that keep rows apart themselves (``keeps_rows_apart``: the
    quantized linears); routed experts do so too (``eager_experts_forward`` and the shadows'
    ``QuantizedExperts`` ask ``must_split``). Only those modules compute products; everything else
    runs outside the mode, which costs a Python call per torch call."""
    global _depth
    modules = [m for m in model.modules() if isinstance(m, nn.Linear)]
    modules += [adapter.router(layer) for layer in adapter.moe_layers]
    modules = [m for m in modules if not getattr(m, "keeps_rows_apart", False)]
    entered: list[RowExact | None] = []

    def before(module, args, kwargs):
        x = _first_tensor(args, kwargs)
        mode = RowExact() if x is not None and _rows(x) > 1 else None
        if mode is not None:
            mode.__enter__()
        entered.append(mode)

    def after(module, args, kwargs, output):
        mode = entered.pop()
        if mode is not None:
            mode.__exit__(None, None, None)

    handles = []
    _depth += 1
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(m.register_forward_hook(after, with_kwargs=True, always_call=True))
        yield
    finally:
        _depth -= 1
        for h in handles:
            h.remove()
