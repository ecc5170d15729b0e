"""The predictors the baselines use: next-layer gate, stacked gates, and MoE-Infinity's activation matrix.

Written here because ``odmoe/predict/predictors.py`` was not available yet; each is a few lines.
Tap point (BASELINES.md §3.3, a documented choice): the gates of later layers are applied to ``u_l``,
the post-attention-normalized state that layer ``l``'s own router sees (the expert hook's input), with
no further normalization. Routing math is Mixtral's: softmax over the logits, top-k, renormalize.
"""

from __future__ import annotations

import numpy as np
import torch

from odmoe.models.adapter import MoEAdapter


def topk_route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, indices) [T, k] of Mixtral routing from router logits [T, E]."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, i = torch.topk(probs, k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), i


class StackedGates:
    """Routers of layers l+1..l+D stacked into one (D*E) x H matrix: one GEMM predicts D layers (HOBBIT);
    D = 1 is the next-layer gate of Mixtral-Offloading and AdapMoE."""

    def __init__(self, adapter: MoEAdapter, depth: int):
        self.adapter = adapter
        self.depth = depth
        layers = adapter.moe_layers
        self.targets = {m: layers[i + 1 : i + 1 + depth] for i, m in enumerate(layers)}
        self.stacked = {
            m: torch.cat([adapter.router(t).weight.detach() for t in ts])
            for m, ts in self.targets.items()
            if ts
        }

    @torch.no_grad()
    def predict(self, layer: int, u: torch.Tensor, k: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """[(target layer, weights [T, k], experts [T, k])] for the layers after ``layer``, nearest first."""
        if layer not in self.stacked:
            return []
        logits = u @ self.stacked[layer].T
        E = self.adapter.num_experts
        return [
            (t, *topk_route(logits[:, d * E : (d + 1) * E], k)) for d, t in enumerate(self.targets[layer])
        ]


class ActivationMatrixTracer:
    """MoE-Infinity's request-level tracing (arXiv 2401.14361, expert activation tracing;
    ``moe_infinity/memory/expert_tracer.py``): the current request's expert activation matrix (EAM, L x E
    token counts, prompt and decode) matched against a collection of EAMs (EAMC).

    * The collection starts with the offline trace (``load``: persistent entries, never replaced) and has
      room for ``capacity`` entries; a finished request fills a free slot, else replaces the least
      accessed non-persistent entry (``finish_entry``).
    * Matching (``find_most_similar``): cosine similarity per layer (of activation ratios, as the code
      normalizes them), averaged over the layers the current request has activated so far; the most
      similar entry wins and its access count grows. Recomputed when the request's EAM changes.
    * Scores: the matched EAM's activation ratios with the code's layer decay ``1 - (l' - l)/(L + 1)``
      (``expert_predictor.py``); for eviction we extend it cyclically (a layer already run this token runs
      again next token at distance ``l' - l + L``) — our choice, since decode revisits every layer."""

    def __init__(self, num_layers: int, num_experts: int, capacity: int = 1000):
        self.L, self.E = num_layers, num_experts
        self.capacity = int(capacity)
        self.collection = np.zeros((0, num_layers, num_experts))
        self.unit = np.zeros((0, num_layers * num_experts))  # each row a unit vector, flattened
        self.access = np.zeros(0)
        self.persistent = 0
        self.eam = np.zeros((num_layers, num_experts))
        self._match: np.ndarray | None = None

    @staticmethod
    def _normalize(m: np.ndarray) -> np.ndarray:
        return m / np.maximum(m.sum(axis=-1, keepdims=True), 1e-12)

    @staticmethod
    def _unit_rows(m: np.ndarray) -> np.ndarray:
        """[..., L, E] -> [..., L*E]: every layer's row scaled to unit length (zero rows stay zero), so a
        dot product is the sum over layers of the per-layer cosine similarities."""
        u = m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)
        return u.reshape(*m.shape[:-2], -1)

    def load(self, trace: np.ndarray) -> None:
        """The offline collection [N, L, E] (MoE-Infinity's ``load_trace``): persistent entries."""
        if len(trace) > self.capacity:
            raise ValueError(f"offline trace of {len(trace)} EAMs exceeds the EAMC capacity {self.capacity}")
        self.collection = np.asarray(trace, dtype=float).copy()
        self.unit = self._unit_rows(self.collection)
        self.access = np.zeros(len(trace))
        self.persistent = len(trace)

    def begin(self) -> None:
        self.eam = np.zeros((self.L, self.E))
        self._match = None

    def record(self, slot: int, experts: torch.Tensor) -> None:
        np.add.at(self.eam[slot], experts.reshape(-1).cpu().numpy(), 1)
        self._match = None

    def end(self) -> None:
        if self.eam.sum() == 0:
            return
        if len(self.collection) < self.capacity:
            self.collection = np.concatenate([self.collection, self.eam[None]])
            self.unit = np.concatenate([self.unit, self._unit_rows(self.eam)[None]])
            self.access = np.append(self.access, 1.0)
        elif self.persistent < self.capacity:
            i = self.persistent + int(np.argmin(self.access[self.persistent :]))
            self.collection[i], self.unit[i], self.access[i] = self.eam, self._unit_rows(self.eam), 1.0

    def best_match(self) -> np.ndarray:
        """The collection's EAM most similar to the current one (the current one when nothing matches)."""
        if self._match is not None:
            return self._match
        if not len(self.collection) or not self.eam.any():
            return self.eam
        # sum over layers of per-layer cosines; layers not yet activated add 0 to every entry, so the
        # argmax is that of the mean over the activated layers
        i = int(np.argmax(self.unit @ self._unit_rows(self.eam)))
        self.access[i] += 1
        self._match = self.collection[i]
        return self._match

    def scores(self, slot: int, cyclic: bool = False) -> np.ndarray:
        """Decayed activation ratios [L, E] seen from MoE-layer ``slot``: future layers only (prefetch),
        or every layer with cyclic distance (eviction)."""
        probs = self._normalize(self.best_match())
        dist = np.arange(self.L) - slot
        if cyclic:
            dist = dist % self.L
        decay = 1 - dist / (self.L + 1)
        out = probs * decay[:, None]
        if not cyclic:
            out[dist <= 0] = 0
        return out
