"""Scaled Emulative Prediction: replay a shadow in lockstep with a recorded full-precision decode.

The full model is decoded once per prompt (``record_reference``), keeping what alignment needs:
its tokens, its routing (the ground truth of recall) and, for every decode iteration, the K/V
entries it wrote for the new position in every layer. Each shadow configuration is then replayed
against that record (``emulate``); its routing at iteration n is the prediction of the full
model's routing at iteration n.

Indexing (``odmoe.trace``; PAPER.md §11 item 20): decode iteration n = 1..O consumes output token
o_n, which sits at position P + n - 1, and writes that position's KV. Alignment before iteration n
therefore has the full model's o_n and the KV of o_1..o_{n-1} available.

Alignment schedule (the paper gives periods, not phases; our choice): with period p an alignment
happens before iterations n = 1, 1 + p, 1 + 2p, ... Token alignment at n feeds the full model's
o_n instead of the shadow's own argmax (so the shadow always starts from the full model's first
token). KV alignment at n >= 2 overwrites the shadow's cache entries, cast to the shadow's dtype,
for either

* ``since_last`` (default; PAPER.md §11 item 6 option B): every decode position not yet aligned,
  o_{n-p} .. o_{n-1}, so after each alignment the shadow's decode KV equals the full model's; or
* ``newest`` (option A): only o_{n-1}, the KV of the token generated last — the literal reading
  of "the KV of the newly generated token"; positions in between keep the shadow's own KV.

Without token alignment at n the shadow feeds its own argmax; without KV alignment it keeps its own
KV (PAPER.md §4.3). The shadow runs its own prefill on the prompt (§11 item 19); ``prompt_kv=True``
additionally overwrites its whole prompt KV with the full model's after prefill (an extension).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from odmoe.decoding import next_token
from odmoe.errors import OdmoeError
from odmoe.models.adapter import MoEAdapter
from odmoe.predict.shadow import Shadow
from odmoe.trace import Trace, forward_step, reference_decode

KV_POSITIONS = ("since_last", "newest")
# Named alignment modes of the recall experiment; any ``T{p}_KV{q}`` (p, q a period or ``off``) works too.
NAMED_ALIGNMENTS = {"none": (None, None), "token": (1, None), "kv": (None, 1), "token_kv": (1, 1)}
_MODE = re.compile(r"^T(\w+)_KV(\w+)$")


def check_period(period, what: str) -> int | None:
    """A period as an int >= 1, or None for ``off``/``none``/null; anything else is a clear error."""
    if period is None or (isinstance(period, str) and period.lower() in ("off", "none", "null")):
        return None
    try:
        value = int(period)
    except (TypeError, ValueError):
        value = None
    if value is None or value != float(period) or value < 1:
        raise OdmoeError(
            f"{what} alignment period {period!r} is invalid; use a whole number of decode iterations >= 1 "
            "(the paper studies 1, 2, 4, 8, 16) or 'off'"
        )
    return value


@dataclass(frozen=True)
class Alignment:
    """When and what the full model sends the shadow. Periods are in decode iterations; None is off."""

    token_period: int | None = 1
    kv_period: int | None = 1
    kv_positions: str = "since_last"
    prompt_kv: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_period", check_period(self.token_period, "token"))
        object.__setattr__(self, "kv_period", check_period(self.kv_period, "KV"))
        if self.kv_positions not in KV_POSITIONS:
            raise OdmoeError(
                f"unknown kv_positions {self.kv_positions!r}; use since_last (all positions since the last "
                "KV alignment) or newest (only the last generated token)"
            )

    @property
    def name(self) -> str:
        """The paper's legend name, e.g. ``T1_KV1``, ``T1_KVoff``."""
        return f"T{self.token_period or 'off'}_KV{self.kv_period or 'off'}"

    def token_at(self, n: int) -> bool:
        return self.token_period is not None and (n - 1) % self.token_period == 0

    def kv_at(self, n: int) -> bool:
        return self.kv_period is not None and n >= 2 and (n - 1) % self.kv_period == 0

    @classmethod
    def parse(cls, mode: str, kv_positions: str = "since_last", prompt_kv: bool = False) -> Alignment:
        """``none``, ``token``, ``kv``, ``token_kv`` or ``T{p}_KV{q}`` (e.g. ``T1_KV4``, ``T2_KVoff``)."""
        if mode in NAMED_ALIGNMENTS:
            token, kv = NAMED_ALIGNMENTS[mode]
        elif m := _MODE.match(str(mode)):
            token, kv = m.group(1), m.group(2)
        else:
            raise OdmoeError(
                f"unknown alignment mode {mode!r}; use {', '.join(NAMED_ALIGNMENTS)} or T<p>_KV<q> "
                "with p, q a period >= 1 or 'off' (e.g. T1_KV4)"
            )
        return cls(token, kv, kv_positions, prompt_kv)


@dataclass
class ReferenceRecord:
    """One full-precision greedy decode and what alignment needs from it.

    ``decode_kv[i]`` is layer i's (keys, values) for the position each decode iteration consumed,
    [O, heads, head_dim] each; ``prompt_kv[i]`` is layer i's prompt (keys, values), [heads, P, dim].
    """

    trace: Trace
    prompt_kv: list[tuple[torch.Tensor, torch.Tensor]]
    decode_kv: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def output_len(self) -> int:
        return len(self.trace.tokens)


@torch.inference_mode()
def record_reference(model, adapter: MoEAdapter, prompt_id: str, prompt, output_len: int) -> ReferenceRecord:
    """``odmoe.trace.reference_decode`` that also keeps the prompt's KV and each new position's KV."""
    snapshots: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def keep(cache: DynamicCache) -> None:
        rows = slice(None) if not snapshots else -1  # after prefill the whole prompt, then the new position
        snapshots.append(
            [(layer.keys[0, :, rows].clone(), layer.values[0, :, rows].clone()) for layer in cache.layers]
        )

    trace = reference_decode(model, adapter, prompt_id, prompt, output_len, on_step=keep)
    prompt_kv, steps = snapshots[0], snapshots[1:]
    decode_kv = [
        (torch.stack([s[i][0] for s in steps]), torch.stack([s[i][1] for s in steps]))
        for i in range(len(prompt_kv))
    ]
    return ReferenceRecord(trace, prompt_kv, decode_kv)


@dataclass
class Emulation:
    """What a shadow did over one prompt, indexed by decode iteration n - 1."""

    experts: np.ndarray  # [O, Lm, k] the shadow's routing = the prediction
    inputs: np.ndarray  # [O] the token the shadow consumed
    own_tokens: np.ndarray  # [O] the shadow's own argmax after each iteration
    token_aligned: np.ndarray  # [O] bool
    kv_aligned: np.ndarray  # [O] bool: KV overwritten just before this iteration
    cache: DynamicCache  # the shadow's KV cache after the last iteration


def _overwrite_kv(
    cache: DynamicCache, kv: list[tuple[torch.Tensor, torch.Tensor]], first: int, last: int, n: int
):
    """Overwrite the shadow's cache entries of o_first..o_last (1-based) before iteration n."""
    for layer, (keys, values) in zip(cache.layers, kv, strict=True):
        # o_m sits (n - m) entries from the end of the cache before iteration n (also under a sliding window)
        count = min(last - first + 1, layer.keys.shape[-2] - (n - 1 - last))
        if count <= 0:
            continue
        end = layer.keys.shape[-2] - (n - 1 - last)
        src = slice(last - count, last)  # rows of o_{last-count+1}..o_last
        layer.keys[0, :, end - count : end] = keys[src].transpose(0, 1).to(layer.keys.dtype)
        layer.values[0, :, end - count : end] = values[src].transpose(0, 1).to(layer.values.dtype)


@torch.inference_mode()
def emulate(shadow: Shadow, record: ReferenceRecord, alignment: Alignment) -> Emulation:
    """Run ``shadow`` over the record's prompt for as many iterations as the record, aligning as told."""
    model = shadow.model
    device = next(model.parameters()).device
    trace = record.trace
    out_len = record.output_len
    cache = DynamicCache(config=model.config)
    logits = forward_step(model, torch.as_tensor(trace.prompt, device=device)[None], cache)
    shadow.pop_routing()  # prefill routing is not predicted (PAPER.md §5)
    if alignment.prompt_kv:
        for layer, (keys, values) in zip(cache.layers, record.prompt_kv, strict=True):
            count = min(layer.keys.shape[-2], keys.shape[-2])
            layer.keys[0, :, -count:] = keys[:, -count:].to(layer.keys.dtype)
            layer.values[0, :, -count:] = values[:, -count:].to(layer.values.dtype)
    prompt = trace.prompt.tolist()
    own = next_token(model, prompt, logits)
    experts, inputs, own_tokens = [], [], []
    token_flags = np.zeros(out_len, dtype=bool)
    kv_flags = np.zeros(out_len, dtype=bool)
    last_aligned = 0  # decode KV of o_1..o_last_aligned already equals the full model's
    for n in range(1, out_len + 1):
        if alignment.token_at(n):
            token_flags[n - 1] = True
            token = int(trace.tokens[n - 1])
        else:
            token = own
        if alignment.kv_at(n):
            kv_flags[n - 1] = True
            first = last_aligned + 1 if alignment.kv_positions == "since_last" else n - 1
            _overwrite_kv(cache, record.decode_kv, first, n - 1, n)
            last_aligned = n - 1
        logits = forward_step(model, torch.tensor([[token]], device=device), cache)
        experts.append(shadow.pop_routing()[0])
        inputs.append(token)
        own = next_token(model, prompt + inputs, logits)
        own_tokens.append(own)
    return Emulation(
        np.stack(experts),
        np.asarray(inputs, dtype=np.int64),
        np.asarray(own_tokens, dtype=np.int64),
        token_flags,
        kv_flags,
        cache,
    )
