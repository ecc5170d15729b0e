"""Predictor families published since OD-MoE, re-implemented on the harness (issue 16; docs/predictors.md).

=================  ======================================================================================
``fate``           Fate (arXiv 2502.12224): layer j's gate input u_j fed to layer j+1's gate. Built in
                   ``predictors.build_predictors`` as a ``GatePredictor`` (no training); see there.
``preattn``        pre-attention expert prediction (arXiv 2511.10676): two linear functions on layer t's
                   normalized pre-attention activation predict layer t's routing, trained with a
                   ranking loss. Its own design point is d = 0 (``same_layer``); d >= 1 reads x_j.
``moe_beyond``     MoE-Beyond (arXiv 2508.17137): a small transformer encoder over routing traces
                   (gate inputs + a layer embedding -> multi-hot experts, BCE). Its own design point is
                   d = 0 on the gate input; d >= 1 reads u_j with the target distance embedded.
=================  ======================================================================================

Both trained families fit on every prefill and decode position of the calibration captures only
(disjoint from the evaluation prompts) and keep their training cost (``cost``: seconds, steps,
parameters, final loss), which ``+exp=predictors`` reports.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from odmoe.errors import OdmoeError
from odmoe.predict.harness import Capture, PastView, Predictor


def _topk(logits: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
    scores = np.asarray(logits)
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k].astype(np.int64)


def calibration_positions(calib: Sequence[Capture], tap: str, name: str) -> tuple[torch.Tensor, ...]:
    """Every prefill and decode position of the calibration captures: (states [N, Lm, H] of ``tap``,
    router probabilities [N, Lm, E], multi-hot routing [N, Lm, E])."""
    if not calib:
        raise OdmoeError(f"the {name} predictor needs calibration traces; set exp.calib_prompts >= 1")
    xs, ps, ys = [], [], []
    for c in calib:
        for part, routing in ((c.prefill, c.trace.prefill_experts), (c.decode, c.trace.decode_experts)):
            xs.append(part[tap])
            ps.append(part["p"])
            y = np.zeros(part["p"].shape, dtype=np.float32)
            np.put_along_axis(y, routing, 1.0, axis=2)
            ys.append(y)
    as_t = lambda a: torch.as_tensor(np.concatenate(a), dtype=torch.float32)  # noqa: E731
    return as_t(xs), as_t(ps), as_t(ys)


def rms_normalized(x: torch.Tensor | np.ndarray, eps: float = 1e-6):
    """x / rms(x) over the last axis: the RMSNorm before attention without its (learnable, diagonal) weight,
    which the predictor's first linear function absorbs."""
    if isinstance(x, np.ndarray):
        return x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps).astype(x.dtype)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ---------------------------------------------------------------------------------------------
# Pre-attention expert prediction (arXiv 2511.10676)
# ---------------------------------------------------------------------------------------------
class PreAttentionPredictor(Predictor):
    """Two linear functions on the normalized pre-attention activation, trained with a ranking loss.

    The paper: layer t's activation before its attention block (after the input RMSNorm) goes through
    two linear functions to scores over layer t's experts, trained so their ranking matches the
    router's ("ranking-aware loss"); it reports exact match of the whole top-k (93.03% DeepSeek-V2-Lite,
    94.69% Qwen3-30B, 97.62% Phi-mini-MoE). Design point d = 0 (``same_layer``): the prediction for
    layer t is ready when layer t's attention starts.

    Here, one head per (source slot j, distance d), d = 0..``max_lookahead``: W2 (W1 x̂_j + b1) + b2 with
    x̂_j = x_j / rms(x_j) (the input norm's diagonal weight is absorbed by W1), width ``hidden``, no
    nonlinearity between (the paper's "2 linear functions"). The paper's loss is not specified in what
    we could read; we use ListNet's listwise cross-entropy between the router's softmax (captured
    ``p``) and the predictor's softmax, a standard ranking loss linear in E. d >= 1 (x_j predicting
    slot j+d) is our extension so the family has a curve on the harness; d = 0 is the paper's.
    Adam on ``steps`` random batches of ``batch`` positions, seeded.
    """

    name = "preattn"

    def __init__(
        self,
        max_lookahead: int = 8,
        hidden: int = 32,
        steps: int = 300,
        batch: int = 256,
        lr: float = 3e-3,
        seed: int = 0,
    ):
        self.max_lookahead = max_lookahead
        self.hidden, self.steps, self.batch, self.lr, self.seed = hidden, steps, batch, lr, seed
        self.cost: dict = {}

    def fit(self, calib: Sequence[Capture]) -> PreAttentionPredictor:
        t0 = time.process_time()
        x, p, _ = calibration_positions(calib, "x", self.name)
        x = rms_normalized(x)
        n, lm, h = x.shape
        e = p.shape[-1]
        dd = min(self.max_lookahead, lm - 1)
        target = torch.zeros(n, lm, dd + 1, e)  # [N, source slot j, d, E]: router probabilities of slot j+d
        mask = torch.zeros(lm, dd + 1, 1)
        for d in range(dd + 1):
            target[:, : lm - d, d] = p[:, d:]
            mask[: lm - d, d] = 1.0
        g = torch.Generator().manual_seed(self.seed)
        m = self.hidden
        w1 = (torch.randn(lm, dd + 1, h, m, generator=g) / h**0.5).requires_grad_()
        b1 = torch.zeros(lm, dd + 1, m, requires_grad=True)
        w2 = (torch.randn(lm, dd + 1, m, e, generator=g) / m**0.5).requires_grad_()
        b2 = torch.zeros(lm, dd + 1, e, requires_grad=True)
        params = [w1, b1, w2, b2]
        opt = torch.optim.Adam(params, lr=self.lr)
        for _ in range(self.steps):
            idx = torch.randint(0, n, (min(self.batch, n),), generator=g)
            hid = torch.einsum("nlh,ldhm->nldm", x[idx], w1) + b1
            logits = torch.einsum("nldm,ldme->nlde", hid, w2) + b2
            listnet = -(target[idx] * torch.log_softmax(logits, dim=-1)).sum(-1, keepdim=True)
            loss = (listnet * mask).sum() / (mask.sum() * len(idx))
            opt.zero_grad()
            loss.backward()
            opt.step()
        self._w = [t.detach().numpy() for t in params]
        self.dd = dd
        self.cost = {
            "train_cpu_s": round(time.process_time() - t0, 2),
            "train_steps": self.steps,
            "train_positions": n,
            "parameters": int(sum(t.numel() for t in params)),
            "final_loss": round(float(loss.detach()), 4),
        }
        return self

    def _scores(self, x: np.ndarray, j: int, ds: np.ndarray) -> np.ndarray:
        w1, b1, w2, b2 = self._w
        hid = np.einsum("h,dhm->dm", rms_normalized(x.astype(np.float32)), w1[j, ds]) + b1[j, ds]
        return np.einsum("dm,dme->de", hid, w2[j, ds]) + b2[j, ds]

    def predict(self, view: PastView, d_max: int) -> np.ndarray:
        j = view.j
        ds = np.arange(1, min(d_max, self.dd, view.num_slots - 1 - j) + 1)
        return _topk(self._scores(view.state("x")[j], j, ds), view.top_k)

    def same_layer(self, capture: Capture) -> np.ndarray:
        """The paper's design point: slot t of every decode iteration from its own x_t: [O, Lm, k]."""
        w1, b1, w2, b2 = self._w
        x = rms_normalized(capture.decode["x"].astype(np.float32))  # [O, Lm, H]
        hid = np.einsum("olh,lhm->olm", x, w1[:, 0]) + b1[:, 0]
        return _topk(np.einsum("olm,lme->ole", hid, w2[:, 0]) + b2[:, 0], capture.top_k)


# ---------------------------------------------------------------------------------------------
# MoE-Beyond (arXiv 2508.17137, ngavhane/moe-beyond)
# ---------------------------------------------------------------------------------------------
class _Encoder(torch.nn.Module):
    """MoE-Beyond's ExpertPredictor at a chosen size: input projection, TransformerEncoder (no positional
    encoding, as the original), head Linear -> GELU -> Linear to E logits. Source-layer and target-distance
    embeddings are added to the projected input."""

    def __init__(self, h: int, e: int, lm: int, dd: int, d_model: int, heads: int, layers: int, ff: int):
        super().__init__()
        self.proj = torch.nn.Linear(h, d_model)
        self.layer = torch.nn.Embedding(lm, d_model)
        self.distance = torch.nn.Embedding(dd + 1, d_model)
        block = torch.nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = torch.nn.Sequential(
            torch.nn.Linear(d_model, d_model), torch.nn.GELU(), torch.nn.Linear(d_model, e)
        )

    def forward(self, u: torch.Tensor, j: torch.Tensor, d: torch.Tensor, window: int) -> torch.Tensor:
        """u [B, T, H] gate inputs of source slots j [B] for distances d [B] -> logits [B, T, E]; position t
        attends to positions t-window+1..t only (causal, bounded context)."""
        t = u.shape[1]
        z = self.proj(u) + (self.layer(j) + self.distance(d))[:, None]
        i = torch.arange(t)
        blocked = (i[None, :] > i[:, None]) | (i[None, :] <= i[:, None] - window)
        return self.head(self.encoder(z, mask=blocked))


class MoEBeyondPredictor(Predictor):
    """A small transformer trained on routing traces to output multi-hot expert activations.

    The original (``transformer_model/transformer_train*.py``): each trace row is one (token, layer) with
    the hidden state entering that layer's gate and a layer embedding; a 4-layer, 8-head, d_model 512
    ``TransformerEncoder`` over a prompt's rows outputs E logits per row (BCE against the multi-hot
    experts; top-k at inference). Trained on 66 M rows of DeepSeek-V2-Lite traces of Puffin prompts,
    evaluated on unseen WebGLM-QA prompts: 97.5% accuracy (per-expert binary, true negatives included),
    86.6% F1. Its rows pair a layer's gate input with that layer's own experts (d = 0).

    Here: the row of token t at source slot j is u_j(t) plus embeddings of j and of the target distance
    d; the encoder runs causally over the last ``context`` tokens (a prefetcher sees only the past; the
    original encodes a whole prompt bidirectionally) and the last row's logits are the top-k for slot
    j+d. d = 0 (``same_layer``) is the original's pairing; d >= 1 is our extension. Default size is
    scaled to the embedded model (d_model 32, 2 layers, 4 heads, ff 64); Adam on ``steps`` batches of
    ``batch`` (prompt, j, d) sequences of the calibration captures, seeded.
    """

    name = "moe_beyond"

    def __init__(
        self,
        max_lookahead: int = 8,
        d_model: int = 32,
        heads: int = 4,
        layers: int = 2,
        ff: int = 64,
        context: int = 16,
        steps: int = 1000,
        batch: int = 32,
        lr: float = 3e-3,
        seed: int = 0,
    ):
        self.max_lookahead = max_lookahead
        self.size = (d_model, heads, layers, ff)
        self.context, self.steps, self.batch, self.lr, self.seed = context, steps, batch, lr, seed
        self.cost: dict = {}

    def fit(self, calib: Sequence[Capture]) -> MoEBeyondPredictor:
        t0 = time.process_time()
        if not calib:
            raise OdmoeError(
                f"the {self.name} predictor needs calibration traces; set exp.calib_prompts >= 1"
            )
        seqs, targets = [], []
        for c in calib:  # one sequence per prompt: prefill then decode positions
            u = np.concatenate([c.prefill["u"], c.decode["u"]])
            routing = np.concatenate([c.trace.prefill_experts, c.trace.decode_experts])
            y = np.zeros((*routing.shape[:2], c.decode["p"].shape[-1]), dtype=np.float32)
            np.put_along_axis(y, routing, 1.0, axis=2)
            seqs.append(u)
            targets.append(y)
        t = min(len(s) for s in seqs)  # equal lengths in +exp=predictors; otherwise cropped to the shortest
        u = torch.as_tensor(np.stack([s[:t] for s in seqs]), dtype=torch.float32)  # [C, T, Lm, H]
        y = torch.as_tensor(np.stack([s[:t] for s in targets]))  # [C, T, Lm, E]
        _, _, lm, h = u.shape
        e = y.shape[-1]
        self.dd = dd = min(self.max_lookahead, lm - 1)
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        self.model = _Encoder(h, e, lm, dd, *self.size)
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        bce = torch.nn.BCEWithLogitsLoss()
        for _ in range(self.steps):
            ci = torch.randint(0, len(seqs), (self.batch,), generator=g)
            d = torch.randint(0, dd + 1, (self.batch,), generator=g)
            j = (torch.rand(self.batch, generator=g) * (lm - d)).long()  # source slots whose j+d exists
            logits = self.model(u[ci, :, j], j, d, self.context)
            loss = bce(logits, y[ci, :, j + d])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)  # as the original
            opt.step()
        self.model.eval()
        self.cost = {
            "train_cpu_s": round(time.process_time() - t0, 2),
            "train_steps": self.steps,
            "train_positions": int(len(seqs) * t),
            "parameters": int(sum(p.numel() for p in self.model.parameters())),
            "final_loss": round(float(loss.detach()), 4),
        }
        return self

    @torch.no_grad()
    def _last(self, u: np.ndarray, j: int, ds: np.ndarray) -> np.ndarray:
        """Logits of the last row for each distance in ``ds``: u [T, H] of slot j -> [len(ds), E]."""
        x = torch.as_tensor(u[-self.context :], dtype=torch.float32)[None].expand(len(ds), -1, -1)
        n = len(ds)
        logits = self.model(x, torch.full((n,), j), torch.as_tensor(ds), self.context)
        return logits[:, -1].numpy()

    def predict(self, view: PastView, d_max: int) -> np.ndarray:
        j = view.j
        ds = np.arange(1, min(d_max, self.dd, view.num_slots - 1 - j) + 1)
        u = np.concatenate(
            [view.prefill_state("u")[:, j], view.past_state("u")[:, j], view.state("u")[j : j + 1]]
        )
        return _topk(self._last(u, j, ds), view.top_k)

    @torch.no_grad()
    def same_layer(self, capture: Capture) -> np.ndarray:
        """The original's pairing: slot t of every decode iteration from its own gate input: [O, Lm, k]."""
        u = np.concatenate([capture.prefill["u"], capture.decode["u"]])  # [P+O, Lm, H]
        lm, o = capture.num_slots, capture.output_len
        x = torch.as_tensor(u, dtype=torch.float32).permute(1, 0, 2)  # [Lm, T, H]
        logits = self.model(x, torch.arange(lm), torch.zeros(lm, dtype=torch.long), self.context)
        return _topk(logits[:, -o:].permute(1, 0, 2).numpy(), capture.top_k)
