"""Prediction quality as the schedulers see it: how many of a layer's k experts were predicted right.

A cacheless worker only cares about the count ``hits[n, j]`` (0..k) of correctly predicted experts at decode
iteration ``n`` and MoE layer ``j``: the ``k - hits`` others are reloaded on the critical path. The counts come from

* a recall value (Eq. 3): each of the k experts is predicted right independently with probability ``recall``
  (a choice: real misses are likely correlated within a layer, which would stall fewer layers at equal recall);
* random prefetch: the overlap of two uniformly drawn k-subsets of E experts (hypergeometric, mean k^2/E);
* a recall trace from a real run: predicted and true expert sets, or ready-made hit counts (:func:`load_hits`).

Arrays are ``[iterations, moe_layers]`` of int; iteration 0 is decode iteration n = 1 (``odmoe.trace``'s
convention).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from odmoe.errors import OdmoeError


def perfect(iterations: int, layers: int, k: int) -> np.ndarray:
    return np.full((iterations, layers), k, dtype=np.int64)


def from_recall(recall: float, iterations: int, layers: int, k: int, seed: int = 0) -> np.ndarray:
    """Independent per-expert hits with probability ``recall``. The same seed draws the same uniforms for every
    recall value, so hits only grow with recall (common random numbers: sweeps and bisections are smooth)."""
    if not 0.0 <= recall <= 1.0:
        raise OdmoeError(f"recall {recall} is outside [0, 1]")
    u = np.random.default_rng(seed).random((iterations, layers, k))
    return (u < recall).sum(-1).astype(np.int64)


def random_prefetch(num_experts: int, k: int, iterations: int, layers: int, seed: int = 0) -> np.ndarray:
    """Overlap of a random k-subset with the true k-subset of E experts (hypergeometric)."""
    rng = np.random.default_rng(seed)
    return rng.hypergeometric(k, num_experts - k, k, size=(iterations, layers)).astype(np.int64)


def from_sets(true: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Set intersection sizes of ``[N, L, k]`` true and predicted expert ids (Eq. 2's c(q, n, l))."""
    if true.shape[:2] != predicted.shape[:2]:
        raise OdmoeError(f"true sets {true.shape} and predicted sets {predicted.shape} differ in shape")
    t = true[..., :, None] == predicted[..., None, :]
    return t.any(-1).sum(-1).astype(np.int64)


def recall_of(hits: np.ndarray, k: int) -> float:
    """Eq. 3: the micro-average of hits over all (iteration, layer) pairs."""
    return float(hits.sum() / (k * hits.size)) if hits.size else float("nan")


def fit(hits: np.ndarray, iterations: int, layers: int) -> np.ndarray:
    """``hits`` resized to ``iterations`` rows (a shorter trace is repeated); the layer count must match."""
    if hits.shape[1] != layers:
        raise OdmoeError(
            f"the recall trace has {hits.shape[1]} MoE layers but the simulated model has {layers}; "
            "use a trace of the same model, or a recall value (exp.recall=...)"
        )
    reps = -(-iterations // hits.shape[0])
    return np.tile(hits, (reps, 1))[:iterations]


def load_hits(path: str | Path, k: int) -> np.ndarray:
    """Hit counts from a recall trace file (CSV or parquet), one row per (decode iteration, MoE layer).

    Columns: ``pos`` (decode iteration, 1-based), ``layer``, an optional ``prompt_id`` (only the first prompt is
    used), and either ``hits`` (0..k) or both ``experts`` and ``predicted`` (lists of expert ids, as in
    ``odmoe.trace`` files).
    """
    path = Path(path)
    if not path.exists():
        raise OdmoeError(
            f"no recall trace at {path}; pass a file written by the recall harness or use exp.recall=VALUE"
        )
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if "phase" in df:
        df = df[df["phase"] == "decode"]
    if "prompt_id" in df:
        df = df[df["prompt_id"] == df["prompt_id"].iloc[0]]
    need = {"pos", "layer"}
    if not need <= set(df.columns) or not (
        {"hits"} <= set(df.columns) or {"experts", "predicted"} <= set(df.columns)
    ):
        raise OdmoeError(
            f"{path}: a recall trace needs columns pos, layer and hits (or experts and predicted)"
        )
    df = df.sort_values(["pos", "layer"])
    if "hits" in df:
        hits = df["hits"].to_numpy()
    else:
        true = np.stack([np.asarray(x) for x in df["experts"]])
        pred = np.stack([np.asarray(x) for x in df["predicted"]])
        hits = from_sets(true[:, None], pred[:, None])[:, 0]
    layers = df["layer"].nunique()
    if len(hits) % layers:
        raise OdmoeError(f"{path}: every decode iteration needs a row for each of the {layers} MoE layers")
    hits = hits.reshape(-1, layers).astype(np.int64)
    if hits.min() < 0 or hits.max() > k:
        raise OdmoeError(f"{path}: hit counts must lie in 0..{k} (top-k of the simulated model)")
    return hits
