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

``emulate`` is the reference implementation. ``replay`` takes the fastest path that computes the
same thing: with token alignment every iteration the shadow's inputs are known, so every iteration
runs in one forward pass (``replay_parallel``, attention over the full model's and the shadow's own
K/V under ``mixed_mask``), which agrees with ``emulate`` up to the rounding of its larger products;
every other mode runs the prompts of each length as one batch (``emulate_batch``), row-exact
(``odmoe.models.rowexact``), so bit for bit ``emulate``'s (``docs/sep.md``, "Fast replay").
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from odmoe.decoding import next_token
from odmoe.errors import OdmoeError
from odmoe.models.adapter import MoEAdapter
from odmoe.models.rowexact import row_exact
from odmoe.predict.shadow import Shadow
from odmoe.trace import PaddedBatch, Trace, forward_step, reference_decode, reference_decode_batch

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
    [O, heads, head_dim] each; ``prompt_kv[i]`` is layer i's prompt (keys, values), [heads, P, dim]. Both
    are what the cache holds: for multi-head latent attention (DeepSeek) one "head" of the compressed
    latent as keys and of the rotary key as values, of different widths.
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

    with row_exact(model, adapter):
        trace = reference_decode(model, adapter, prompt_id, prompt, output_len, on_step=keep)
    prompt_kv, steps = snapshots[0], snapshots[1:]
    decode_kv = [
        (torch.stack([s[i][0] for s in steps]), torch.stack([s[i][1] for s in steps]))
        for i in range(len(prompt_kv))
    ]
    return ReferenceRecord(trace, prompt_kv, decode_kv)


def by_length(items: Sequence, length: Callable[[object], int], batch: Callable[[list], list]) -> list:
    """``batch`` over the items of each length, its results back in the items' order: a batch of one
    length has no padding, so it can be row-exact."""
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(length(item), []).append(i)
    out: list = [None] * len(items)
    for indices in groups.values():
        for i, result in zip(indices, batch([items[i] for i in indices]), strict=True):
            out[i] = result
    return out


@torch.inference_mode()
def record_references(
    model, adapter: MoEAdapter, prompts: Sequence[tuple[str, Iterable[int]]], output_len: int
) -> list[ReferenceRecord]:
    """``record_reference`` of several (prompt_id, prompt) pairs, one batched decode per prompt length:
    bit for bit the batch-1 records (``rowexact``)."""

    def batch(part: list[tuple[str, list[int]]]) -> list[ReferenceRecord]:
        with row_exact(model, adapter):
            return _record_batch(model, adapter, part, output_len)

    return by_length([(pid, list(p)) for pid, p in prompts], lambda p: len(p[1]), batch)


def _record_batch(
    model, adapter: MoEAdapter, prompts: Sequence[tuple[str, Iterable[int]]], output_len: int
) -> list[ReferenceRecord]:
    prompt_kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    steps: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per iteration, per layer: [B, heads, dim]

    def keep(cache: DynamicCache, batch: PaddedBatch) -> None:
        if not prompt_kv:  # after prefill: each row's prompt, without its padding
            for b, pad in enumerate(batch.pads):
                prompt_kv.append(
                    [(la.keys[b, :, pad:].clone(), la.values[b, :, pad:].clone()) for la in cache.layers]
                )
        else:  # the position every row just consumed
            steps.append([(la.keys[:, :, -1].clone(), la.values[:, :, -1].clone()) for la in cache.layers])

    traces = reference_decode_batch(model, adapter, prompts, output_len, on_step=keep)
    layers = range(len(steps[0]))
    stacked = [
        (torch.stack([s[i][0] for s in steps], 1), torch.stack([s[i][1] for s in steps], 1)) for i in layers
    ]
    return [
        ReferenceRecord(trace, prompt_kv[b], [(keys[b], values[b]) for keys, values in stacked])
        for b, trace in enumerate(traces)
    ]


@dataclass
class Emulation:
    """What a shadow did over one prompt, indexed by decode iteration n - 1."""

    experts: np.ndarray  # [O, Lm, k] the shadow's routing = the prediction
    inputs: np.ndarray  # [O] the token the shadow consumed
    own: np.ndarray | Callable[[], np.ndarray]  # ``own_tokens``, or how to compute them on first use
    token_aligned: np.ndarray  # [O] bool
    kv_aligned: np.ndarray  # [O] bool: KV overwritten just before this iteration
    cache: DynamicCache  # the shadow's KV cache after the last iteration

    @property
    def own_tokens(self) -> np.ndarray:
        """[O] the shadow's own choice after each iteration (``next_token``). A parallel replay, whose
        inputs do not depend on them, picks them only when asked (one ``next_token`` per iteration)."""
        if callable(self.own):
            self.own = self.own()
        return self.own


def _overwrite_kv(
    cache: DynamicCache,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    first: int,
    last: int,
    n: int,
    row: int = 0,
):
    """Overwrite the shadow's cache entries of o_first..o_last (1-based) before iteration n, in batch ``row``."""
    for layer, (keys, values) in zip(cache.layers, kv, strict=True):
        # o_m sits (n - m) entries from the end of the cache before iteration n (also under a sliding window)
        count = min(last - first + 1, layer.keys.shape[-2] - (n - 1 - last))
        if count <= 0:
            continue
        end = layer.keys.shape[-2] - (n - 1 - last)
        src = slice(last - count, last)  # rows of o_{last-count+1}..o_last
        layer.keys[row, :, end - count : end] = keys[src].transpose(0, 1).to(layer.keys.dtype)
        layer.values[row, :, end - count : end] = values[src].transpose(0, 1).to(layer.values.dtype)


@torch.inference_mode()
def emulate(shadow: Shadow, record: ReferenceRecord, alignment: Alignment) -> Emulation:
    """Run ``shadow`` over the record's prompt for as many iterations as the record, aligning as told."""
    with row_exact(shadow.model, shadow.adapter):
        return _emulate(shadow, record, alignment)


def _emulate(shadow: Shadow, record: ReferenceRecord, alignment: Alignment) -> Emulation:
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


# ---------------------------------------------------------------------------------------------
# Fast replays: every iteration in one pass (token period 1), or all prompts as one batch
# ---------------------------------------------------------------------------------------------
REPLAYS = ("auto", "sequential")
_MIXED = "odmoe_sep_mixed"
_mixed: dict = {}  # the pass in progress: layer -> full K/V, the mask, the model's own attention


def kv_sources(alignment: Alignment, out_len: int) -> np.ndarray:
    """[O, O] bool: entry (n-1, m-1) says decode position o_m holds the full model's KV when iteration n runs.

    The schedule is ``emulate``'s, step by step (``since_last`` / ``newest``); o_m's KV is otherwise
    the shadow's own, written by iteration m and never changed by a later one.
    """
    full = np.zeros(out_len, dtype=bool)
    rows = np.zeros((out_len, out_len), dtype=bool)
    last_aligned = 0
    for n in range(1, out_len + 1):
        if alignment.kv_at(n):
            first = last_aligned + 1 if alignment.kv_positions == "since_last" else n - 1
            full[first - 1 : n - 1] = True
            last_aligned = n - 1
        rows[n - 1] = full
    return rows


def mixed_mask(
    alignment: Alignment, prompt_len: int, out_len: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """Additive mask [1, 1, L, 2L] (L = P + O) over keys [full model's L | shadow's own L].

    A prompt position attends causally to the shadow's own prompt (its own prefill). Iteration n
    (query P + n - 1) attends to the prompt (the full model's with ``prompt_kv``), to every earlier
    decode position, the full model's entry where ``kv_sources`` says it was aligned and the shadow's
    own otherwise, and to its own new entry: exactly the cache ``emulate`` holds at iteration n.
    """
    p, o = prompt_len, out_len
    length = p + o
    allowed = torch.zeros(length, 2 * length, dtype=torch.bool)
    allowed[:p, length : length + p] = torch.ones(p, p, dtype=torch.bool).tril()
    allowed[p:, :p] = alignment.prompt_kv
    allowed[p:, length : length + p] = not alignment.prompt_kv
    earlier = torch.ones(o, o, dtype=torch.bool).tril(-1)
    full = torch.as_tensor(kv_sources(alignment, o)) & earlier
    allowed[p:, p:length] = full
    allowed[p:, length + p :] = (earlier & ~full) | torch.eye(o, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def _mixed_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own attention over [full model's K/V | the shadow's own K/V] under ``mixed_mask``.

    A latent-attention module (DeepSeek's MLA) caches latents and expands them into per-head K/V before
    attention; the full model's cache rows are latents too, so they are expanded the same way here."""
    full_keys, full_values = _mixed["kv"][module.layer_idx]
    if hasattr(module, "expand_kv"):
        full_keys, full_values = module.expand_kv(full_keys, full_values)
    keys = torch.cat([full_keys, key], dim=2)
    values = torch.cat([full_values, value], dim=2)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(_mixed["inner"], eager)
    return inner(module, query, keys, values, _mixed["mask"], **kwargs)


ALL_ATTENTION_FUNCTIONS.register(_MIXED, _mixed_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(_MIXED, sdpa_mask)  # built by the model, unused by the above


@contextmanager
def _mixed_pass(model, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor):
    config = model.config
    own = config._attn_implementation
    _mixed.update(kv=kv, mask=mask, inner=own)
    config._attn_implementation = _MIXED
    try:
        yield
    finally:
        config._attn_implementation = own
        _mixed.clear()


def parallel_blocker(shadow: Shadow, record: ReferenceRecord, alignment: Alignment) -> str | None:
    """Why ``replay_parallel`` cannot reproduce ``emulate`` for this configuration (None: it can)."""
    if alignment.token_period != 1:
        return "the shadow feeds its own tokens (token period != 1)"
    config = shadow.model.config
    if config._attn_implementation not in ("sdpa", "eager"):
        return (
            f"attention implementation {config._attn_implementation!r} (parallel replay needs sdpa or eager)"
        )
    window = getattr(config, "sliding_window", None)
    if (
        getattr(config, "use_sliding_window", True)
        and window
        and window < len(record.trace.prompt) + record.output_len
    ):
        return f"a sliding window of {window} positions, shorter than prompt + output"
    return None


@torch.inference_mode()
def replay_parallel(shadow: Shadow, record: ReferenceRecord, alignment: Alignment) -> Emulation:
    """``emulate`` with token alignment every iteration, as one forward pass over prompt + o_1..o_O.

    With token period 1 every input is the full model's o_n, known from the record, so the shadow's
    hidden state at iteration n depends only on the K/V it attends to. Without KV alignment (or
    prompt KV) that is a plain teacher-forced forward; with it, one layer-by-layer pass whose
    attention (``mixed_mask``) gives every query exactly the cache ``emulate`` holds at its
    iteration. Routing and own tokens agree with ``emulate`` up to the rounding of batched kernels.
    """
    reason = parallel_blocker(shadow, record, alignment)
    if reason is not None:
        raise OdmoeError(f"parallel SEP replay does not apply to {alignment.name}: {reason}; use emulate")
    model = shadow.model
    device = next(model.parameters()).device
    trace = record.trace
    p, o = len(trace.prompt), record.output_len
    ids = torch.as_tensor(np.concatenate([trace.prompt, trace.tokens]), device=device)[None]
    cache = DynamicCache(config=model.config)
    full_kv = [
        (
            torch.cat([pk, dk.transpose(0, 1)], dim=1)[None].to(shadow.dtype),
            torch.cat([pv, dv.transpose(0, 1)], dim=1)[None].to(shadow.dtype),
        )
        for (pk, pv), (dk, dv) in zip(record.prompt_kv, record.decode_kv, strict=True)
    ]
    kv_flags = np.asarray([alignment.kv_at(n) for n in range(1, o + 1)])
    forward = dict(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=o)
    if kv_flags.any() or alignment.prompt_kv:
        mask = mixed_mask(alignment, p, o, shadow.dtype, device)
        with _mixed_pass(model, [full_kv[i] for i in range(len(full_kv))], mask):
            logits = model(**forward).logits[0]
    else:
        logits = model(**forward).logits[0]
    experts = shadow.pop_routing()[p:]
    # the cache emulate ends with: what the alignment before iteration O had sent, the shadow's own elsewhere
    last = torch.as_tensor(kv_sources(alignment, o)[-1], device=device)
    for layer, (keys, values) in zip(cache.layers, full_kv, strict=True):
        rows = torch.cat([torch.full((p,), alignment.prompt_kv, device=device), last])
        layer.keys[0, :, rows] = keys[0, :, rows]
        layer.values[0, :, rows] = values[0, :, rows]
    history = [*trace.prompt.tolist(), *trace.tokens.tolist()]

    def own() -> np.ndarray:
        return np.asarray([next_token(model, history[: p + n], logits[n - 1]) for n in range(1, o + 1)])

    return Emulation(
        experts,
        trace.tokens.copy(),
        own,
        np.ones(o, dtype=bool),
        kv_flags,
        cache,
    )


@torch.inference_mode()
def emulate_batch(
    shadow: Shadow, records: Sequence[ReferenceRecord], alignment: Alignment
) -> list[Emulation]:
    """``emulate`` of several records at once: one decode iteration of every prompt per forward.

    Prompts are left-padded (``odmoe.trace.PaddedBatch``); each row aligns, picks its own tokens and
    has its KV overwritten exactly as ``emulate`` does for it alone. The records must have the same
    number of output tokens. With prompts of one length (no padding) every row is ``emulate``'s bit
    for bit (``rowexact``); padded rows attend under a mask, which rounds differently.
    """
    if not records:
        return []
    with row_exact(shadow.model, shadow.adapter):
        return _emulate_batch(shadow, records, alignment)


def _emulate_batch(
    shadow: Shadow, records: Sequence[ReferenceRecord], alignment: Alignment
) -> list[Emulation]:
    out_len = records[0].output_len
    if any(r.output_len != out_len for r in records):
        raise OdmoeError("emulate_batch needs records with the same output length; batch them by length")
    model = shadow.model
    device = next(model.parameters()).device
    rows = len(records)
    batch = PaddedBatch([r.trace.prompt for r in records], device)
    cache = DynamicCache(config=model.config)
    logits = batch.prefill(model, cache)
    shadow.pop_routing()
    if alignment.prompt_kv:
        for b, record in enumerate(records):
            for layer, (keys, values) in zip(cache.layers, record.prompt_kv, strict=True):
                count = min(layer.keys.shape[-2], keys.shape[-2])
                layer.keys[b, :, -count:] = keys[:, -count:].to(layer.keys.dtype)
                layer.values[b, :, -count:] = values[:, -count:].to(layer.values.dtype)
    prompts = [r.trace.prompt.tolist() for r in records]
    own = [next_token(model, prompts[b], logits[b]) for b in range(rows)]
    experts, inputs, own_tokens = [], [[] for _ in records], []
    token_flags = np.zeros(out_len, dtype=bool)
    kv_flags = np.zeros(out_len, dtype=bool)
    last_aligned = 0
    for n in range(1, out_len + 1):
        if alignment.token_at(n):
            token_flags[n - 1] = True
            tokens = [int(r.trace.tokens[n - 1]) for r in records]
        else:
            tokens = own
        if alignment.kv_at(n):
            kv_flags[n - 1] = True
            first = last_aligned + 1 if alignment.kv_positions == "since_last" else n - 1
            for b, record in enumerate(records):
                _overwrite_kv(cache, record.decode_kv, first, n - 1, n, row=b)
            last_aligned = n - 1
        logits = batch.step(model, cache, tokens)
        experts.append(shadow.pop_routing())  # [B, Lm, k]
        for b in range(rows):
            inputs[b].append(tokens[b])
        own = [next_token(model, prompts[b] + inputs[b], logits[b]) for b in range(rows)]
        own_tokens.append(own)
    experts_arr, own_arr = np.stack(experts, axis=1), np.asarray(own_tokens, dtype=np.int64).T
    return [
        Emulation(
            experts_arr[b],
            np.asarray(inputs[b], dtype=np.int64),
            own_arr[b],
            token_flags.copy(),
            kv_flags.copy(),
            _row_cache(cache, b, batch.pads[b]) if rows > 1 else cache,
        )
        for b in range(rows)
    ]


def _row_cache(cache: DynamicCache, row: int, pad: int) -> DynamicCache:
    """Row ``row`` of a batched cache as a batch-1 cache, without its padding."""
    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(
            layer.keys[row : row + 1, :, pad:].clone(), layer.values[row : row + 1, :, pad:].clone(), i
        )
    return out


def replay(
    shadow: Shadow, records: Sequence[ReferenceRecord], alignment: Alignment, method: str = "auto"
) -> tuple[list[Emulation], str]:
    """Every record's emulation by the fastest exact path; returns them and the path taken.

    ``auto``: ``replay_parallel`` per record where it applies (token period 1), else
    ``emulate_batch`` over the records of each prompt length (bit for bit ``emulate``'s);
    ``sequential``: ``emulate`` one record at a time (the reference implementation).
    """
    if method not in REPLAYS:
        raise OdmoeError(
            f"unknown replay {method!r}; use auto (fastest exact path) or sequential (reference)"
        )
    if method == "sequential":
        return [emulate(shadow, r, alignment) for r in records], "sequential"
    if records and all(parallel_blocker(shadow, r, alignment) is None for r in records):
        return [replay_parallel(shadow, r, alignment) for r in records], "parallel"
    batch = by_length(
        records, lambda r: len(r.trace.prompt), lambda part: emulate_batch(shadow, part, alignment)
    )
    return batch, "batched"
