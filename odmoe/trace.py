"""Reference decoding and routing traces.

The reference is the fully cached model at its loaded precision (fp32 by default), greedy, batch 1,
with a KV cache. Its routing is recorded through the adapter's expert hook, so the trace holds
exactly the experts the model used (whatever its router does: softmax top-k, group-limited,
biased).

Indexing (PAPER.md §11 item 20): the prompt's tokens are positions ``0..P-1`` of the *prefill*
phase. Output token ``o_1`` is the argmax after prefill. Decode iteration ``n`` (1-based,
``n = 1..O``) consumes ``o_n`` and produces ``o_{n+1}``; its routing is decode row ``n``. So a trace
with ``O`` output tokens has ``O`` decode rows, and the argmax of the last iteration is dropped.

File format (one parquet file per prompt, a directory per trace set), one row per
(phase, position, MoE layer):

============  ===========  ===============================================================
column        type         meaning
============  ===========  ===============================================================
prompt_id     string       prompt identifier
phase         string       ``prefill`` or ``decode``
pos           int32        prompt position (prefill, 0-based) or decode iteration n (1-based)
token         int32        input token of that position / iteration
layer         int16        decoder-layer index of the MoE layer
experts       list<int16>  the top-k routed experts, in the router's order
weights       list<float>  their gate weights as the model applied them
============  ===========  ===============================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import DynamicCache

from odmoe.decoding import next_token
from odmoe.errors import OdmoeError
from odmoe.models.adapter import MoEAdapter, eager_experts_forward


@dataclass
class Trace:
    """Routing and tokens of one prompt. Arrays are indexed [position, MoE-layer slot, k]."""

    prompt_id: str
    prompt: np.ndarray  # [P]
    tokens: np.ndarray  # [O] output tokens o_1..o_O (decode inputs)
    moe_layers: tuple[int, ...]
    prefill_experts: np.ndarray  # [P, Lm, k]
    prefill_weights: np.ndarray
    decode_experts: np.ndarray  # [O, Lm, k]
    decode_weights: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        frames = []
        for phase, tokens, experts, weights, first in (
            ("prefill", self.prompt, self.prefill_experts, self.prefill_weights, 0),
            ("decode", self.tokens, self.decode_experts, self.decode_weights, 1),
        ):
            n, lm, _ = experts.shape
            frames.append(
                pd.DataFrame(
                    {
                        "prompt_id": self.prompt_id,
                        "phase": phase,
                        "pos": np.repeat(np.arange(first, first + n, dtype=np.int32), lm),
                        "token": np.repeat(tokens.astype(np.int32), lm),
                        "layer": np.tile(np.asarray(self.moe_layers, dtype=np.int16), n),
                        "experts": list(experts.reshape(n * lm, -1).astype(np.int16)),
                        "weights": list(weights.reshape(n * lm, -1).astype(np.float32)),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> Trace:
        moe_layers = tuple(int(x) for x in sorted(df["layer"].unique()))
        lm = len(moe_layers)

        def phase(name: str):
            part = df[df["phase"] == name].sort_values(["pos", "layer"])
            n = len(part) // lm
            experts = np.stack(part["experts"].to_numpy()).astype(np.int64).reshape(n, lm, -1)
            weights = np.stack(part["weights"].to_numpy()).astype(np.float32).reshape(n, lm, -1)
            return part["token"].to_numpy()[::lm].astype(np.int64), experts, weights

        prompt, pe, pw = phase("prefill")
        tokens, de, dw = phase("decode")
        return cls(str(df["prompt_id"].iloc[0]), prompt, tokens, moe_layers, pe, pw, de, dw)


def save_trace(trace: Trace, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{trace.prompt_id}.parquet"
    tmp = path.with_suffix(".tmp")
    trace.to_frame().to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def load_traces(directory: str | Path) -> list[Trace]:
    files = sorted(Path(directory).glob("*.parquet"))
    if not files:
        raise OdmoeError(
            f"no routing traces in {directory}; run `python -m experiments.run +exp=reference` first"
        )
    return [Trace.from_frame(pd.read_parquet(f)) for f in files]


class RoutingRecorder:
    """Captures the (indices, weights) each MoE layer uses, through the adapter's expert hook."""

    def __init__(self, adapter: MoEAdapter):
        self.adapter = adapter
        self.calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _hook(self, layer: int):
        def forward(module, hidden, top_k_index, top_k_weights):
            self.calls.setdefault(layer, []).append(
                (top_k_index.detach().cpu(), top_k_weights.detach().float().cpu())
            )
            return eager_experts_forward(module, hidden, top_k_index, top_k_weights)

        return forward

    @contextmanager
    def installed(self) -> Iterator[RoutingRecorder]:
        for layer in self.adapter.moe_layers:
            self.adapter.set_experts_forward(layer, self._hook(layer))
        try:
            yield self
        finally:
            self.adapter.clear_experts_forward()

    def pop(self) -> tuple[np.ndarray, np.ndarray]:
        """Routing of the forward passes since the last pop: ([T, Lm, k] experts, weights)."""
        layers = self.adapter.moe_layers
        experts = torch.stack([torch.cat([i for i, _ in self.calls[layer]]) for layer in layers], dim=1)
        weights = torch.stack([torch.cat([w for _, w in self.calls[layer]]) for layer in layers], dim=1)
        self.calls = {}
        return experts.numpy(), weights.numpy()


def check_length(model, prompt_len: int, output_len: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if prompt_len <= 0 or output_len <= 0:
        raise OdmoeError(f"prompt and output lengths must be positive, got {prompt_len} and {output_len}")
    if limit is not None and prompt_len + output_len > limit:
        raise OdmoeError(
            f"prompt ({prompt_len}) + output ({output_len}) tokens exceed the model's context of {limit}; "
            "use shorter prompts or fewer output tokens"
        )


@torch.no_grad()
def forward_step(model, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """One cached forward pass on ``input_ids`` [1, T]; returns the last position's logits [V]."""
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]


@torch.no_grad()
def reference_decode(
    model,
    adapter: MoEAdapter,
    prompt_id: str,
    prompt: Iterable[int],
    output_len: int,
    on_step: Callable[[DynamicCache], None] | None = None,
) -> Trace:
    """Decode ``output_len`` tokens (``odmoe.decoding``'s rule) and record the routing of prefill and every decode iteration.

    ``on_step`` sees the KV cache after prefill and after every decode iteration (SEP keeps the KV)."""
    prompt = np.asarray(list(prompt), dtype=np.int64)
    check_length(model, len(prompt), output_len)
    device = next(model.parameters()).device
    recorder = RoutingRecorder(adapter)
    cache = DynamicCache(config=model.config)
    tokens, decode_e, decode_w = [], [], []
    with recorder.installed():
        logits = forward_step(model, torch.as_tensor(prompt, device=device)[None], cache)
        prefill_e, prefill_w = recorder.pop()
        if on_step is not None:
            on_step(cache)
        for _ in range(output_len):
            token = next_token(model, [*prompt.tolist(), *tokens], logits)
            tokens.append(token)
            logits = forward_step(model, torch.tensor([[token]], device=device), cache)
            e, w = recorder.pop()
            decode_e.append(e[0])
            decode_w.append(w[0])
            if on_step is not None:
                on_step(cache)
    return Trace(
        prompt_id,
        prompt,
        np.asarray(tokens, dtype=np.int64),
        tuple(adapter.moe_layers),
        prefill_e,
        prefill_w,
        np.stack(decode_e),
        np.stack(decode_w),
    )


class PaddedBatch:
    """Prompts decoded in lockstep as one batch: left padding, per-row positions, one shared cache.

    Row b's prompt sits right-aligned in the first ``width`` cache entries (``pads[b]`` padding
    entries first), so after any number of decode steps every row's newest entries are the last
    ones of the cache, as in a batch-1 decode. Without padding (equal prompt lengths) no attention
    mask is passed, so each row runs the model's own causal path exactly as at batch 1.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], device: torch.device | str):
        lengths = [len(p) for p in prompts]
        if not lengths or min(lengths) <= 0:
            raise OdmoeError("a prompt batch needs at least one prompt, each with at least one token")
        self.width = max(lengths)
        self.pads = [self.width - n for n in lengths]
        ids = torch.zeros(len(prompts), self.width, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.width, dtype=torch.long)
        for b, (p, pad) in enumerate(zip(prompts, self.pads, strict=True)):
            ids[b, pad:] = torch.as_tensor(list(p), dtype=torch.long)
            mask[b, pad:] = 1
        self.input_ids, self.mask = ids.to(device), mask.to(device)
        self.padded = any(self.pads)
        self.next_pos = torch.as_tensor(lengths, device=device)[:, None]

    def __len__(self) -> int:
        return len(self.pads)

    def prefill(self, model, cache: DynamicCache) -> torch.Tensor:
        """The prompts' forward pass; returns each row's last-position logits [B, V]."""
        kwargs = {}
        if self.padded:
            kwargs = {"attention_mask": self.mask, "position_ids": (self.mask.cumsum(-1) - 1).clamp(min=0)}
        out = model(input_ids=self.input_ids, cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1]

    def step(self, model, cache: DynamicCache, tokens: Sequence[int]) -> torch.Tensor:
        """One decode iteration, token b for row b; returns the logits [B, V]."""
        ids = torch.as_tensor(list(tokens), device=self.input_ids.device)[:, None]
        kwargs = {}
        if self.padded:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
            kwargs = {"attention_mask": self.mask, "position_ids": self.next_pos}
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1]


@torch.no_grad()
def reference_decode_batch(
    model,
    adapter: MoEAdapter,
    prompts: Sequence[tuple[str, Iterable[int]]],
    output_len: int,
    on_step: Callable[[DynamicCache, PaddedBatch], None] | None = None,
) -> list[Trace]:
    """``reference_decode`` of several (prompt_id, prompt) pairs at once, one batch row per prompt.

    Every row picks its tokens with ``odmoe.decoding.next_token`` on its own history, so each trace
    is the batch-1 decode's up to the rounding of batched kernels, and bit for bit with prompts of
    one length inside ``odmoe.models.rowexact.row_exact`` (as ``record_references`` runs it).
    ``on_step`` sees the cache and the batch after prefill and after every decode iteration.
    """
    arrays = [np.asarray(list(p), dtype=np.int64) for _, p in prompts]
    for a in arrays:
        check_length(model, len(a), output_len)
    device = next(model.parameters()).device
    batch = PaddedBatch(arrays, device)
    recorder = RoutingRecorder(adapter)
    cache = DynamicCache(config=model.config)
    rows = len(arrays)
    tokens: list[list[int]] = [[] for _ in arrays]
    decode_e, decode_w = [], []
    with recorder.installed():
        logits = batch.prefill(model, cache)
        e, w = recorder.pop()
        prefill_e = e.reshape(rows, batch.width, *e.shape[1:])
        prefill_w = w.reshape(rows, batch.width, *w.shape[1:])
        if on_step is not None:
            on_step(cache, batch)
        for _ in range(output_len):
            step = [
                next_token(model, [*a.tolist(), *t], logits[b])
                for b, (a, t) in enumerate(zip(arrays, tokens, strict=True))
            ]
            for t, token in zip(tokens, step, strict=True):
                t.append(token)
            logits = batch.step(model, cache, step)
            e, w = recorder.pop()
            decode_e.append(e)
            decode_w.append(w)
            if on_step is not None:
                on_step(cache, batch)
    de, dw = np.stack(decode_e, axis=1), np.stack(decode_w, axis=1)  # [B, O, Lm, k]
    return [
        Trace(
            str(pid),
            a,
            np.asarray(tokens[b], dtype=np.int64),
            tuple(adapter.moe_layers),
            prefill_e[b, batch.pads[b] :],
            prefill_w[b, batch.pads[b] :],
            de[b],
            dw[b],
        )
        for b, ((pid, _), a) in enumerate(zip(prompts, arrays, strict=True))
    ]


def reference_traces(
    model, adapter: MoEAdapter, prompts, output_len: int, directory: str | Path
) -> list[Trace]:
    """Traces of ``prompts`` in ``directory``, decoding only the ones not already there (resumable)."""
    from tqdm import tqdm

    directory = Path(directory)
    out = []
    for p in tqdm(prompts, desc="reference decode", leave=False):
        path = directory / f"{p.id}.parquet"
        if path.exists():
            trace = Trace.from_frame(pd.read_parquet(path))
            if len(trace.tokens) == output_len and tuple(trace.prompt) == tuple(p.token_ids):
                out.append(trace)
                continue
        trace = reference_decode(model, adapter, p.id, p.token_ids, output_len)
        save_trace(trace, directory)
        out.append(trace)
    return out
