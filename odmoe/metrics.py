"""Expert-prediction recall, exactly as the paper's Eq. 2 and Eq. 3 (PAPER.md §7).

For prompt q, output-token index n and MoE layer l, ``c(q, n, l) = |S ∩ T|`` is the number of the k
predicted experts ``S`` that are among the k experts the full model really used ``T`` (partial
credit). ``A(q, n)`` is 1 when prompt q produced an n-th output token. Then

    recall(n) = Σ_q Σ_l c(q,n,l) A(q,n) / (k · L · Σ_q A(q,n))             (Eq. 2)
    recall    = Σ_n Σ_q Σ_l c(q,n,l) A(q,n) / (k · L · Σ_n Σ_q A(q,n))     (Eq. 3)

Eq. 3 is a micro-average over every existing (prompt, token) pair, not the mean of Eq. 2 over n.
Per-layer recall uses the same micro-average with l held fixed. Everything here is plain numpy on
index arrays, independent of models, so any predictor (SEP, gate look-ahead, history) reuses it.

Because every quantity is a ratio of sums of hits over sums of slots (``k`` per layer per existing
token), results can be stored as (hits, slots) pairs and aggregated later in any grouping;
``ratio`` does that for a table of rows.
"""

from __future__ import annotations

import numpy as np


def hits(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """``c = |S ∩ T|`` over the last axis: ``predicted`` [..., k] and ``true`` [..., k] -> [...].

    Each set is assumed to hold distinct experts (a top-k always does); a prediction with fewer or
    more than k members may be passed padded with -1, which never matches.
    """
    predicted = np.asarray(predicted)
    true = np.asarray(true)
    if predicted.shape[:-1] != true.shape[:-1]:
        raise ValueError(f"predicted {predicted.shape} and true {true.shape} disagree before the k axis")
    match = (predicted[..., :, None] == true[..., None, :]) & (predicted[..., :, None] >= 0)
    return match.any(axis=-1).sum(axis=-1)


def _exists(c: np.ndarray, exists: np.ndarray | None) -> np.ndarray:
    if exists is None:
        return np.ones(c.shape[:2], dtype=bool)
    exists = np.asarray(exists, dtype=bool)
    if exists.shape != c.shape[:2]:
        raise ValueError(f"A(q, n) has shape {exists.shape}, expected {c.shape[:2]}")
    return exists


def recall_per_token(c: np.ndarray, k: int, exists: np.ndarray | None = None) -> np.ndarray:
    """Eq. 2: recall(n) for ``c`` [Q, N, L]; ``exists`` is A(q, n) [Q, N] (all ones by default).

    An index n that no prompt reached has no defined recall and yields NaN.
    """
    c = np.asarray(c, dtype=np.float64)
    a = _exists(c, exists)
    num = (c.sum(axis=2) * a).sum(axis=0)
    den = k * c.shape[2] * a.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def recall_overall(c: np.ndarray, k: int, exists: np.ndarray | None = None) -> float:
    """Eq. 3: the micro-average of c over every existing (prompt, token) pair and every layer."""
    c = np.asarray(c, dtype=np.float64)
    a = _exists(c, exists)
    den = k * c.shape[2] * a.sum()
    return float((c.sum(axis=2) * a).sum() / den) if den else float("nan")


def recall_per_layer(c: np.ndarray, k: int, exists: np.ndarray | None = None) -> np.ndarray:
    """Recall of each layer slot l: Σ_q Σ_n c(q,n,l) A(q,n) / (k · Σ_q Σ_n A(q,n)) -> [L]."""
    c = np.asarray(c, dtype=np.float64)
    a = _exists(c, exists)
    den = k * a.sum()
    if not den:
        return np.full(c.shape[2], np.nan)
    return (c * a[:, :, None]).sum(axis=(0, 1)) / den


def ratio(frame, by: str | list[str] | None = None, hits_col: str = "hits", slots_col: str = "slots"):
    """Σ hits / Σ slots of a table of (hits, slots) rows, overall or grouped ``by`` columns.

    With one row per (prompt, n) holding ``hits = Σ_l c`` and ``slots = k · L``, grouping by n gives
    Eq. 2 and no grouping gives Eq. 3.
    """
    if by is None:
        slots = frame[slots_col].sum()
        return float(frame[hits_col].sum() / slots) if slots else float("nan")
    sums = frame.groupby(by)[[hits_col, slots_col]].sum()
    return sums[hits_col] / sums[slots_col]


def predicted_count(predicted: np.ndarray) -> np.ndarray:
    """Distinct valid (>= 0) experts in each predicted set: [..., k] -> [...] (the predicted positives)."""
    s = np.sort(np.asarray(predicted), axis=-1)
    new = np.ones(s.shape, dtype=bool)
    new[..., 1:] = s[..., 1:] != s[..., :-1]
    return ((s >= 0) & new).sum(axis=-1)


def label_metrics(hits: int, predicted: int, exact: int, rows: int, k: int, num_experts: int) -> dict:
    """The other papers' metrics from the same counts (BASELINES.md §0.1), so a predictor's number can be set
    beside its paper's in that paper's own metric.

    ``rows`` (token, layer) predictions with ``hits`` = Σ c, ``predicted`` = Σ predicted experts and
    ``exact`` = rows whose whole top-k set was right. ``exact_match``: exact / rows (arXiv 2511.10676);
    ``label_accuracy``: per-expert binary accuracy over all E experts, true negatives included
    (MoE-Beyond's "accuracy"); ``label_f1``: the mean F1 of the two classes (active, inactive), as
    scikit-learn's ``f1_score(average="macro")`` on the flattened labels (MoE-Beyond's F1).
    """
    if rows <= 0:
        return {"exact_match": float("nan"), "label_accuracy": float("nan"), "label_f1": float("nan")}
    tp, fp, fn = hits, predicted - hits, k * rows - hits
    tn = num_experts * rows - tp - fp - fn
    f1 = [2 * a / (2 * a + fp + fn) if a + fp + fn else 1.0 for a in (tp, tn)]
    return {
        "exact_match": exact / rows,
        "label_accuracy": (tp + tn) / (num_experts * rows),
        "label_f1": float(np.mean(f1)),
    }


def request_speed(prompt_len: int, tokens: list[int], t0: float, t_first: float, t_last: float) -> dict:
    """TTFT and throughputs of one request from its clock readings (start, first token, last token).

    Decode throughput counts the tokens after the first (the first comes from prefill); output
    throughput counts every output token over prefill and decode, as the paper's Table 2."""
    n, decode_s = len(tokens), t_last - t_first
    return {
        "prompt_len": prompt_len,
        "output_len": n,
        "tokens": tokens,
        "ttft_s": t_first - t0,
        "decode_s": decode_s,
        "decode_tok_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan"),
        "output_tok_s": n / (t_last - t0),
    }
