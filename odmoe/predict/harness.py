"""One lookahead-recall harness for every expert-activation predictor (BASELINES.md §0.1, §3.0).

Capture once, evaluate offline. Per prompt the full model decodes greedily once
(``capture_reference``) while torch hooks record, at every MoE layer and every position, the three
tap points of BASELINES.md §0.2::

    x_l  residual entering layer l        (pre-hook on ``input_layernorm``)
    h_l  residual after attention          (pre-hook on ``post_attention_layernorm``)
    u_l  post-attention-norm state = router input; the router's softmax probabilities p_l

plus the routing (the ground truth) and, for SEP, the per-position KV (``record_reference``). Every
predictor is then replayed on these arrays, which is cheap.

Knowledge point (n, j). Decode iteration n (1-based, consuming o_n) has routed MoE slot j: known
are everything of the prompt (prefill), of iterations 1..n-1, the tokens o_1..o_n, and of iteration
n the states x, h, u, p and the routing of slots 0..j. The layer output x_{j+1} is *not* included:
reading it counts as reading slot j+1 (BASELINES.md §0.2). A predictor at (n, j) predicts the top-k
of slot j+d, d = 1..D, of the same iteration; targets beyond the last layer (the next token's
layers) are not scored, so recall at d averages over target slots d..Lm-1. Lookahead is counted
in MoE slots (equal to layers for Mixtral).

``PastView`` is how a predictor sees (n, j): every accessor returns a slice that ends at (n, j),
so a predictor cannot read the future even by mistake; the oracle alone (``uses_future``) is
also handed the capture. ``scramble_after`` builds the test input that checks this.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from odmoe.errors import OdmoeError
from odmoe.metrics import hits as set_hits
from odmoe.metrics import predicted_count
from odmoe.models.adapter import MoEAdapter
from odmoe.trace import Trace

if TYPE_CHECKING:
    from odmoe.predict.sep import ReferenceRecord

TAPS = ("x", "h", "u")


# ---------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------
@dataclass
class Capture:
    """States and routing of one prompt's reference decode. Arrays: [position, MoE slot, ...]."""

    prompt_id: str
    trace: Trace
    prompt_embedding: np.ndarray  # [H] mean input embedding of the prompt (fMoE's semantic key)
    prefill: dict[str, np.ndarray]  # tap -> [P, Lm, H]; "p" -> [P, Lm, E] router probabilities
    decode: dict[str, np.ndarray]  # tap -> [O, Lm, H]; "p" -> [O, Lm, E]
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. "sep_int8" -> [O, Lm, k]

    @property
    def output_len(self) -> int:
        return len(self.trace.tokens)

    @property
    def num_slots(self) -> int:
        return len(self.trace.moe_layers)

    @property
    def top_k(self) -> int:
        return self.trace.decode_experts.shape[-1]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        t = self.trace
        arrays = {
            "prompt": t.prompt,
            "tokens": t.tokens,
            "moe_layers": np.asarray(t.moe_layers),
            "prefill_experts": t.prefill_experts,
            "prefill_weights": t.prefill_weights,
            "decode_experts": t.decode_experts,
            "decode_weights": t.decode_weights,
            "prompt_embedding": self.prompt_embedding,
        }
        arrays |= {f"prefill_{k}": v for k, v in self.prefill.items()}
        arrays |= {f"decode_{k}": v for k, v in self.decode.items()}
        arrays |= {f"extra_{k}": v for k, v in self.extra.items()}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, prompt_id=np.asarray(self.prompt_id), **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Capture:
        z = np.load(path)
        trace = Trace(
            str(z["prompt_id"]),
            z["prompt"],
            z["tokens"],
            tuple(int(i) for i in z["moe_layers"]),
            z["prefill_experts"],
            z["prefill_weights"],
            z["decode_experts"],
            z["decode_weights"],
        )
        pick = lambda prefix: {k[len(prefix) :]: z[k] for k in z.files if k.startswith(prefix)}  # noqa: E731
        prefill = {k: v for k, v in pick("prefill_").items() if k in (*TAPS, "p")}
        decode = {k: v for k, v in pick("decode_").items() if k in (*TAPS, "p")}
        return cls(trace.prompt_id, trace, z["prompt_embedding"], prefill, decode, pick("extra_"))


@contextmanager
def _state_hooks(adapter: MoEAdapter):
    """Record x, h, u and router probabilities of every MoE layer on every forward call."""
    calls: dict[tuple[str, int], list[torch.Tensor]] = {}
    handles = []

    def keep(tap: str, slot: int, t: torch.Tensor) -> None:
        calls.setdefault((tap, slot), []).append(t.detach().reshape(-1, t.shape[-1]).float().cpu())

    for slot, layer in enumerate(adapter.moe_layers):
        block = adapter.layers[layer]
        handles.append(
            block.input_layernorm.register_forward_pre_hook(lambda m, a, s=slot: keep("x", s, a[0]))
        )
        handles.append(
            block.post_attention_layernorm.register_forward_pre_hook(lambda m, a, s=slot: keep("h", s, a[0]))
        )

        def router_hook(module, args, out, s=slot):
            keep("u", s, args[0])
            logits = out[0] if isinstance(out, tuple) else out
            keep("p", s, torch.softmax(logits.float(), dim=-1))

        handles.append(adapter.router(layer).register_forward_hook(router_hook))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _split_calls(calls, num_slots: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """First forward call = prefill [P, Lm, *]; the rest = one decode iteration each [O, Lm, *]."""
    prefill, decode = {}, {}
    for tap in (*TAPS, "p"):
        per_slot = [calls[(tap, s)] for s in range(num_slots)]
        prefill[tap] = torch.stack([c[0] for c in per_slot], dim=1).numpy()
        decode[tap] = torch.stack([torch.cat(c[1:]) for c in per_slot], dim=1).numpy()
    return prefill, decode


def capture_references(
    model, adapter: MoEAdapter, prompts: Sequence[tuple[str, Sequence[int]]], output_len: int
) -> list[tuple[Capture, ReferenceRecord]]:
    """``capture_reference`` of several (prompt_id, prompt) pairs, one batched decode per prompt length
    (``record_references``: bit for bit the batch-1 records)."""
    from odmoe.predict.sep import by_length

    def batch(part: list) -> list[tuple[Capture, ReferenceRecord]]:
        if len(part) == 1:
            return [capture_reference(model, adapter, *part[0], output_len)]
        return _capture_batch(model, adapter, part, output_len)

    return by_length(list(prompts), lambda p: len(p[1]), batch)


def _capture_batch(
    model, adapter: MoEAdapter, prompts: Sequence[tuple[str, Sequence[int]]], output_len: int
) -> list[tuple[Capture, ReferenceRecord]]:
    """Prompts of one length as one batched decode: a tap's prefill call is [B, P, ...], a decode
    call [B, ...]."""
    from odmoe.predict.sep import record_references

    with _state_hooks(adapter) as calls:
        records = record_references(model, adapter, prompts, output_len)
    rows = len(prompts)
    out = []
    for b, ((pid, prompt), record) in enumerate(zip(prompts, records, strict=True)):
        prefill, decode = {}, {}
        for tap in (*TAPS, "p"):
            per_slot = [calls[(tap, s)] for s in range(adapter.num_moe_layers)]
            prefill[tap] = torch.stack([c[0].reshape(rows, len(prompt), -1)[b] for c in per_slot], 1).numpy()
            decode[tap] = torch.stack([torch.stack([x[b] for x in c[1:]]) for c in per_slot], 1).numpy()
        out.append((Capture(pid, record.trace, _prompt_embedding(model, prompt), prefill, decode), record))
    return out


def _prompt_embedding(model, prompt: Sequence[int]) -> np.ndarray:
    with torch.no_grad():
        emb = model.get_input_embeddings()(
            torch.as_tensor(list(prompt), device=next(model.parameters()).device)
        )
    return emb.float().mean(0).cpu().numpy()


def capture_reference(model, adapter: MoEAdapter, prompt_id: str, prompt: Sequence[int], output_len: int):
    """Greedy reference decode with every tap recorded: ``(Capture, ReferenceRecord)``.

    The record (tokens, routing, per-position KV) is what SEP's alignment needs; routing in the
    capture's trace is exactly the routing the model computed with (the adapter hook).
    """
    from odmoe.predict.sep import record_reference

    with _state_hooks(adapter) as calls:
        record = record_reference(model, adapter, prompt_id, prompt, output_len)
    prefill, decode = _split_calls(calls, adapter.num_moe_layers)
    capture = Capture(prompt_id, record.trace, _prompt_embedding(model, prompt), prefill, decode)
    return capture, record


# ---------------------------------------------------------------------------------------------
# What a predictor may see
# ---------------------------------------------------------------------------------------------
class PastView:
    """Knowledge point (n, j) of one capture: accessors return only what is known there."""

    __slots__ = ("_c", "n", "j")

    def __init__(self, capture: Capture, n: int, j: int):
        if not (1 <= n <= capture.output_len and 0 <= j < capture.num_slots):
            raise OdmoeError(
                f"knowledge point (n={n}, j={j}) outside 1..{capture.output_len} x 0..{capture.num_slots - 1}"
            )
        self._c, self.n, self.j = capture, n, j

    # metadata (no data of the decode)
    @property
    def prompt_id(self) -> str:
        return self._c.prompt_id

    @property
    def num_slots(self) -> int:
        return self._c.num_slots

    @property
    def top_k(self) -> int:
        return self._c.top_k

    @property
    def num_experts(self) -> int:
        return self._c.decode["p"].shape[-1]

    # prompt (fully known)
    def prompt(self) -> np.ndarray:
        return self._c.trace.prompt

    def prompt_embedding(self) -> np.ndarray:
        return self._c.prompt_embedding

    def prefill_routing(self) -> np.ndarray:
        """[P, Lm, k]"""
        return self._c.trace.prefill_experts

    def prefill_state(self, tap: str) -> np.ndarray:
        """[P, Lm, H] (tap x/h/u) or [P, Lm, E] (tap p)."""
        return self._c.prefill[tap]

    # decode so far
    def tokens(self) -> np.ndarray:
        """o_1..o_n (o_n is iteration n's input)."""
        return self._c.trace.tokens[: self.n]

    def past_routing(self) -> np.ndarray:
        """Routing of iterations 1..n-1: [n-1, Lm, k]."""
        return self._c.trace.decode_experts[: self.n - 1]

    def past_state(self, tap: str) -> np.ndarray:
        """States of iterations 1..n-1: [n-1, Lm, H or E]."""
        return self._c.decode[tap][: self.n - 1]

    def routing(self) -> np.ndarray:
        """Routing of iteration n, slots 0..j: [j+1, k]."""
        return self._c.trace.decode_experts[self.n - 1, : self.j + 1]

    def state(self, tap: str) -> np.ndarray:
        """States of iteration n, slots 0..j: [j+1, H or E]."""
        return self._c.decode[tap][self.n - 1, : self.j + 1]

    def extra(self, name: str, d_max: int) -> np.ndarray:
        """A precomputed per-iteration prediction source (SEP's shadow routing) for slots j+1..j+d_max.

        The producer must guarantee its row n uses only what is known at iteration n's start (SEP:
        o_n and the KV of o_1..o_{n-1}); ``tests/test_predictors_sep.py`` checks that for SEP.
        """
        return self._c.extra[name][self.n - 1, self.j + 1 : self.j + 1 + d_max]


class Predictor:
    """Predicts, at knowledge point (n, j), the top-k experts of slots j+1..j+D: the extension point for
    predictors (docs/extending.md; a subclass in any module runs with ``exp.extra_predictors``).

    ``predict(view, d_max)`` (required) returns [d, k] integer expert ids, row i for slot j+1+i, with d
    between the target slots that exist and d_max, -1 for "no prediction"; anything else is an error
    naming the predictor (``checked``). ``fit(calib)`` sees calibration captures only (disjoint from
    the evaluation prompts) and returns self. ``name``: its row in every table. ``max_lookahead``: the
    largest d the method defines (None: any). ``uses_future``: only the oracle (never a plugin).
    """

    name: str = "predictor"
    max_lookahead: int | None = None
    uses_future: bool = False

    def fit(self, calib: Sequence[Capture]) -> Predictor:
        return self

    def predict(self, view: PastView, d_max: int) -> np.ndarray:
        """[d_max, k] expert ids for slots j+1..j+d_max (-1: no prediction); rows past the last slot are ignored."""
        raise NotImplementedError

    def predict_future(self, view: PastView, capture: Capture, d_max: int) -> np.ndarray:
        raise NotImplementedError


def _pad(rows: np.ndarray, d_max: int, k: int) -> np.ndarray:
    out = np.full((d_max, k), -1, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)[:d_max, :k]
    out[: rows.shape[0], : rows.shape[1]] = rows
    return out


def describe(predictor: Predictor) -> str:
    """How an error names a predictor: its row name and its class."""
    cls = type(predictor)
    return f"predictor {predictor.name!r} ({cls.__module__}.{cls.__qualname__})"


def checked(predictor: Predictor, rows, view: PastView, dd: int) -> np.ndarray:
    """``rows`` as the interface promises them, [span..dd, k] integer ids in -1..E-1 (span = the target slots
    that exist), else one clear error naming the predictor: a plugin's bug must not be scored as a miss."""
    arr = np.asarray(rows)
    k, span = view.top_k, min(dd, view.num_slots - 1 - view.j)
    where = f"{describe(predictor)} at (n={view.n}, j={view.j})"
    if arr.ndim != 2 or arr.shape[1] != k or not span <= arr.shape[0] <= dd:
        raise OdmoeError(
            f"{where} returned an array of shape {arr.shape}; predict(view, d_max) must return "
            f"[d, k] = [{span}..{dd}, {k}] expert ids (row i for slot j+1+i, -1 for no prediction)"
        )
    if arr.dtype.kind not in "iu":
        raise OdmoeError(f"{where} returned {arr.dtype} values; return integer expert ids (e.g. np.int64)")
    if arr.size and (int(arr.min()) < -1 or int(arr.max()) >= view.num_experts):
        bad = int(arr.min()) if int(arr.min()) < -1 else int(arr.max())
        raise OdmoeError(
            f"{where} returned expert id {bad}, outside 0..{view.num_experts - 1} (-1 = no prediction)"
        )
    return arr


def lookahead_limit(predictor: Predictor, d_max: int) -> int:
    return d_max if predictor.max_lookahead is None else min(d_max, predictor.max_lookahead)


def predictions(predictor: Predictor, capture: Capture, d_max: int) -> np.ndarray:
    """Every prediction of one prompt: [O, Lm, d_max, k] (-1 where none or the target is past the end)."""
    out_len, lm, k = capture.output_len, capture.num_slots, capture.top_k
    dd = lookahead_limit(predictor, d_max)
    out = np.full((out_len, lm, d_max, k), -1, dtype=np.int64)
    for n in range(1, out_len + 1):
        for j in range(lm - 1):
            view = PastView(capture, n, j)
            p = (
                predictor.predict_future(view, capture, dd)
                if predictor.uses_future
                else predictor.predict(view, dd)
            )
            p = _pad(checked(predictor, p, view, dd), dd, k)
            span = min(dd, lm - 1 - j)
            out[n - 1, j, :span] = p[:span]
    return out


def truth_ahead(capture: Capture, d_max: int) -> tuple[np.ndarray, np.ndarray]:
    """The experts of slot j+d for every (n, j, d): ([O, Lm, d_max, k], valid [Lm, d_max])."""
    true = capture.trace.decode_experts
    out_len, lm, k = true.shape
    out = np.full((out_len, lm, d_max, k), -1, dtype=np.int64)
    valid = np.zeros((lm, d_max), dtype=bool)
    for d in range(1, d_max + 1):
        if d < lm:
            out[:, : lm - d, d - 1] = true[:, d:]
            valid[: lm - d, d - 1] = True
    return out, valid


def hits_by_d(predictor: Predictor, preds: np.ndarray, capture: Capture) -> list[dict]:
    """Eq. 3 numerator and denominator per lookahead d: rows (d, hits, slots).

    ``c = |S ∩ T|`` (``odmoe.metrics.hits``) summed over every iteration n and every source slot j
    whose target j+d exists; slots = k per scored (n, j). d beyond the predictor's ``max_lookahead``
    is not reported (the method offers nothing there).
    """
    d_max = preds.shape[2]
    true, valid = truth_ahead(capture, d_max)
    c = set_hits(preds, true)  # [O, Lm, D]
    npred = predicted_count(preds)
    k = capture.top_k
    rows = []
    for d in range(1, lookahead_limit(predictor, d_max) + 1):
        v = valid[:, d - 1]
        if not v.any():
            continue
        rows.append(
            {
                "d": d,
                "hits": int(c[:, v, d - 1].sum()),
                "slots": int(k * v.sum() * capture.output_len),
                "predicted": int(npred[:, v, d - 1].sum()),
                "exact": int((c[:, v, d - 1] == k).sum()),
            }
        )
    return rows


def same_layer_rows(predictor: Predictor, capture: Capture) -> dict | None:
    """d = 0 for a predictor whose paper predicts a layer from that layer's own pre-attention or gate
    input (``same_layer(capture)`` -> [O, Lm, k] for every decode iteration and slot): one row of counts
    as ``hits_by_d`` gives, or None for predictors without that design point."""
    fn = getattr(predictor, "same_layer", None)
    if fn is None:
        return None
    preds = np.asarray(fn(capture))
    true = capture.trace.decode_experts
    if preds.shape != true.shape:
        raise OdmoeError(f"{describe(predictor)}: same_layer returned {preds.shape}, expected {true.shape}")
    c = set_hits(preds, true)
    k = capture.top_k
    return {
        "d": 0,
        "hits": int(c.sum()),
        "slots": int(c.size * k),
        "predicted": int(predicted_count(preds).sum()),
        "exact": int((c == k).sum()),
    }


# ---------------------------------------------------------------------------------------------
# Test support
# ---------------------------------------------------------------------------------------------
def scramble_after(capture: Capture, n: int, j: int, seed: int = 0) -> Capture:
    """A copy whose every datum after knowledge point (n, j) is replaced by random values.

    Scrambled: iteration n's slots > j (states, probabilities, routing) and every later iteration,
    tokens o_{n+1}.., and precomputed sources (``extra``) of iterations > n. Predictions at (n, j)
    from the copy must equal those from the original.
    """
    rng = np.random.default_rng(seed)
    t = capture.trace
    e = t.num_experts if hasattr(t, "num_experts") else capture.decode["p"].shape[-1]

    def scr_routing(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[n - 1, j + 1 :] = rng.integers(0, e, size=a[n - 1, j + 1 :].shape)
        a[n:] = rng.integers(0, e, size=a[n:].shape)
        return a

    def scr_state(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[n - 1, j + 1 :] = rng.normal(size=a[n - 1, j + 1 :].shape)
        a[n:] = rng.normal(size=a[n:].shape)
        return a

    tokens = t.tokens.copy()
    tokens[n:] = rng.integers(0, max(int(tokens.max()) + 1, 2), size=tokens[n:].shape)
    trace = replace(
        t,
        tokens=tokens,
        decode_experts=scr_routing(t.decode_experts),
        decode_weights=scr_state(t.decode_weights),
    )
    extra = {}
    for name, a in capture.extra.items():
        a = a.copy()
        a[n:] = rng.integers(0, e, size=a[n:].shape)
        extra[name] = a
    decode = {tap: scr_state(a) for tap, a in capture.decode.items()}
    return replace(capture, trace=trace, decode=decode, extra=extra)
