"""The predictors the baselines use: next-layer gate, stacked gates, and MoE-Infinity's activation matrix.

Written here because ``odmoe/predict/predictors.py`` was not available yet; each is a few lines.
Tap point (BASELINES.md §3.3, a documented choice): the gates of later layers are applied to ``u_l``,
the post-attention-normalized state that layer ``l``'s own router sees (the expert hook's input), with
no further normalization. Routing math is Mixtral's: softmax over the logits, top-k, renormalize.
"""

from __future__ import annotations

from collections import deque

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
    """MoE-Infinity's request-level tracing: the current request's expert activation matrix (EAM,
    L x E token counts) matched by cosine similarity against a bounded store of past EAMs (EAMC).

    EAMC replacement is FIFO (the paper leaves it open). Scores follow the public code's layer decay
    ``1 - (l' - l)/(L + 1)``; for eviction we extend it cyclically (a layer already run this token runs
    again next token at distance ``l' - l + L``) — our choice, since decode revisits every layer."""

    def __init__(self, num_layers: int, num_experts: int, capacity: int = 64):
        self.L, self.E = num_layers, num_experts
        self.store: deque[np.ndarray] = deque(maxlen=capacity)
        self.eam = np.zeros((num_layers, num_experts))

    def begin(self) -> None:
        self.eam = np.zeros((self.L, self.E))

    def record(self, slot: int, experts: torch.Tensor) -> None:
        np.add.at(self.eam[slot], experts.reshape(-1).cpu().numpy(), 1)

    def end(self) -> None:
        if self.eam.sum() > 0:
            self.store.append(self.eam.copy())

    def best_match(self) -> np.ndarray:
        """The stored EAM most similar to the current one (the current one itself when none is stored)."""
        if not self.store or self.eam.sum() == 0:
            return self.eam
        cur = self.eam.reshape(-1)
        mats = np.stack(self.store).reshape(len(self.store), -1)
        sims = mats @ cur / (np.linalg.norm(mats, axis=1) * np.linalg.norm(cur) + 1e-12)
        return self.store[int(np.argmax(sims))]

    def scores(self, slot: int, cyclic: bool = False) -> np.ndarray:
        """Decayed activation probabilities [L, E] seen from MoE-layer ``slot``: future layers only
        (the public code's prefetch scores), or every layer with cyclic distance (eviction)."""
        best = self.best_match()
        probs = best / np.maximum(best.sum(axis=1, keepdims=True), 1e-12)
        dist = np.arange(self.L) - slot
        if cyclic:
            dist = dist % self.L
        decay = 1 - dist / (self.L + 1)
        out = probs * decay[:, None]
        if not cyclic:
            out[dist <= 0] = 0
        return out
