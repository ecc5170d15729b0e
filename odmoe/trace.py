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

from collections.abc import Callable, Iterable, Iterator
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
