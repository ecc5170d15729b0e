"""Expert-activation predictors behind one interface (``odmoe.predict.harness.Predictor``).

Each predicts, at knowledge point (n, j) (slot j of decode iteration n routed), the top-k experts of
slots j+1..j+D. Re-implementations of the methods in BASELINES.md §2-§3, labelled as such; where
the papers are silent the choice is stated here and in ``docs/predictors.md``.

=====================  ===========================================================================
``random``             k distinct experts uniformly, seeded per (prompt, n, target slot) (§3.1)
``load_after_routing`` nothing ahead (§3.2): the lower bound, recall 0 for every d >= 1
``oracle``             the true routing (reads the future; the upper bound)
``gate_h``             gate_{j+d}(norm_{j+d}(h_j)): layer j+d's router on layer j's post-attention
                       residual, after layer j+d's own post-attention RMSNorm (§3.3 variant A with
                       the recommended norm). d = 1: Mixtral-Offloading / DAOP; d <= 4: HOBBIT
``gate_x``             the same on x_j, the residual entering layer j (AdapMoE's code, §3.3 B)
``gate_u``             gate_{j+d}(u_j) on the raw router input of layer j (no re-normalization)
``eam``                MoE-Infinity: request-level expert activation matrix, cosine-matched to
                       calibration EAMs, layer-proximity decay (§2.2)
``fmoe``               fMoE expert maps: semantic + trajectory match of per-iteration gate maps (§2.6)
``learned``            ProMoE-style: one small MLP per (source slot, d) on u_j, trained on
                       calibration traces (§3.6)
``sep_<precision>``    SEP: the aligned shadow's own routing of slot j+d (flat in d, see SEPPredictor)
``fate``               Fate (arXiv 2502.12224): layer j's gate input u_j into gate_{j+d}, no
                       re-normalization, no training (its code: ``next_gate_cpu`` on the
                       post-attention-norm output); d = 1 is Fate's, d > 1 our extension. At exactly
                       k predicted experts it is the same arithmetic as ``gate_u``
``preattn``            pre-attention prediction (arXiv 2511.10676), ``odmoe.predict.recent``
``moe_beyond``         MoE-Beyond (arXiv 2508.17137), ``odmoe.predict.recent``
=====================  ===========================================================================

Plugins (``build_plugin_predictors``): any ``Predictor`` subclass from any importable module,
instantiated from ``{_target_: ..., <arguments>}`` (docs/extending.md).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from odmoe.errors import OdmoeError
from odmoe.models.adapter import MoEAdapter
from odmoe.predict.harness import Capture, PastView, Predictor
from odmoe.predict.recent import MoEBeyondPredictor, PreAttentionPredictor, calibration_positions


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores along the last axis, best first (stable on ties)."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    return order[..., :k]


# ---------------------------------------------------------------------------------------------
# Bounds
# ---------------------------------------------------------------------------------------------
class RandomPredictor(Predictor):
    """k of E uniformly. The draw for (n, target slot) comes from a table seeded by (seed, prompt id)
    alone, so it never depends on the model's data (and is the same whichever d asks)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._tables: dict[tuple[str, int], np.ndarray] = {}

    def _block(self, view: PastView, block: int) -> np.ndarray:
        key = (view.prompt_id, block)
        t = self._tables.get(key)
        if t is None:
            rng = np.random.default_rng([self.seed, zlib.crc32(view.prompt_id.encode()), block])
            t = np.argsort(rng.random((64, view.num_slots, view.num_experts)), axis=-1)[..., : view.top_k]
            if len(self._tables) > 64:
                self._tables.clear()
            self._tables[key] = t
        return t

    def predict(self, view: PastView, d_max: int) -> np.ndarray:
        t = self._block(view, (view.n - 1) // 64)
        return t[(view.n - 1) % 64, view.j + 1 : view.j + 1 + d_max]


class LoadAfterRouting(Predictor):
    """No prediction: loading starts when the main model's gate is known (recall 0 ahead)."""

    name = "load_after_routing"

    def predict(self, view: PastView, d_max: int) -> np.ndarray:
        return np.full((d_max, view.top_k), -1, dtype=np.int64)


class Oracle(Predictor):
    """The true routing of the target slot: the upper bound (the only predictor reading the future)."""

    name = "oracle"
    uses_future = True

    def predict_future(self, view: PastView, capture: Capture, d_max: int) -> np.ndarray:
        return capture.trace.decode_experts[view.n - 1, view.j + 1 : view.j + 1 + d_max]


# ---------------------------------------------------------------------------------------------
# Gate look-ahead (Mixtral-Offloading, AdapMoE, DAOP, HOBBIT)
# ---------------------------------------------------------------------------------------------
class RouterBank:
    """Routers and post-attention RMSNorms of every MoE slot, as plain arrays (softmax-linear routers)."""

    def __init__(self, adapter: MoEAdapter):
        routers, norms, eps = [], [], []
        for layer in adapter.moe_layers:
            router = adapter.router(layer)
            if not hasattr(router, "weight"):
                raise OdmoeError(
                    f"layer {layer}'s router has no linear weight; gate predictors need a linear router"
                )
            routers.append(router.weight.detach().float().cpu().numpy())
            norm = adapter.layers[layer].post_attention_layernorm
            norms.append(norm.weight.detach().float().cpu().numpy())
            eps.append(float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))))
        self.routers = np.stack(routers)  # [Lm, E, H]
        self.norms = np.stack(norms)  # [Lm, H]
        self.eps = np.asarray(eps)  # [Lm]

    def logits(self, v: np.ndarray, targets: np.ndarray, renorm: bool) -> np.ndarray:
        """Router logits of slots ``targets`` applied to one state ``v`` [H]: [len(targets), E]."""
        if renorm:
            ms = float(np.mean(v.astype(np.float64) ** 2))
            x = self.norms[targets] * (v[None, :] / np.sqrt(ms + self.eps[targets])[:, None])
        else:
            x = np.broadcast_to(v, (len(targets), v.shape[-1]))
        return np.einsum("teh,th->te", self.routers[targets], x)


class GatePredictor(Predictor):
    """gate_{j+d} applied to slot j's state (``tap`` x, h or u), re-normalized by slot j+d's RMSNorm.

    ``renorm``: apply layer j+d's post-attention RMSNorm to the tapped vector first, because the
    router expects a normalized input (BASELINES.md §3.3). For tap h this gives exactly the input
    the router of j+d would see if attention and experts of the layers in between changed nothing.
    HOBBIT stacks gates j+1..j+D into one GEMM; the arithmetic is the same per target.
    """

    def __init__(
        self,
        bank: RouterBank,
        tap: str = "h",
        renorm: bool = True,
        max_lookahead: int | None = None,
        name: str | None = None,
    ):
        if tap not in ("x", "h", "u"):
            raise OdmoeError(f"unknown gate tap {tap!r}; use x, h or u")
        self.bank, self.tap, self.renorm = bank, tap, renorm
        self.max_lookahead = max_lookahead
        self.name = name or f"gate_{tap}"

    def predict(self, view: PastView, d_max: int) -> np.ndarray:
        j = view.j
        targets = np.arange(j + 1, min(j + 1 + d_max, view.num_slots))
        v = view.state(self.tap)[j]
        return topk(self.bank.logits(v, targets, self.renorm), view.top_k)


# ---------------------------------------------------------------------------------------------
# MoE-Infinity: request-level expert activation matrices
# ---------------------------------------------------------------------------------------------
def eam_of(
    prefill: np.ndarray, past: np.ndarray, current: np.ndarray, num_slots: int, num_experts: int
) -> np.ndarray:
    """Counts [Lm, E] of tokens routed to each expert so far (prefill, earlier iterations, slots <= j now)."""
    eam = np.zeros((num_slots, num_experts), dtype=np.float64)
    for routing in (prefill, past):
        if routing.size:
            slots = np.broadcast_to(np.arange(num_slots)[None, :, None], routing.shape)
            np.add.at(eam, (slots.ravel(), routing.ravel()), 1.0)
    if current.size:
        slots = np.broadcast_to(np.arange(current.shape[0])[:, None], current.shape)
        np.add.at(eam, (slots.ravel(), current.ravel()), 1.0)
    return eam


class EAMPredictor(Predictor):
    """MoE-Infinity's request-level tracing (re-implementation).

    The EAM collection (EAMC) holds the full EAMs (prefill + decode) of the calibration requests,
    at most ``capacity`` (first come; the paper leaves replacement open). At (n, j) the current
    request's partial EAM is cosine-matched to every stored EAM; the best one, row-normalized and
    scaled by the layer decay 1 - (t - j)/(L + 1) for future slots t, is the score. The decay does
    not change a per-slot top-k; it orders prefetches across slots and ranks eviction (``cache.py``).
    """

    name = "eam"

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.library: np.ndarray | None = None

    def fit(self, calib: Sequence[Capture]) -> EAMPredictor:
        eams = []
        for c in calib[: self.capacity]:
            e = c.decode["p"].shape[-1]
            eams.append(
                eam_of(c.trace.prefill_experts, c.trace.decode_experts, np.zeros((0, 1), int), c.num_slots, e)
            )
        if not eams:
            raise OdmoeError(
                "the EAM predictor needs at least one calibration trace; set exp.calib_prompts >= 1"
            )
        lib = np.stack(eams)
        self.library = lib / lib.sum(axis=2, keepdims=True).clip(min=1)  # per-layer activation frequencies
        self._flat = self.library.reshape(len(lib), -1)
        self._flat_norm = np.linalg.norm(self._flat, axis=1).clip(min=1e-12)
        return self

    def match_counts(self, eam: np.ndarray) -> np.ndarray:
        """The stored EAM most cosine-similar to the counts ``eam`` [Lm, E], as per-layer frequencies."""
        if self.library is None:
            raise OdmoeError("the EAM predictor is not fitted; call fit(calibration captures) first")
        flat = eam.ravel()
        sims = self._flat @ flat / (self._flat_norm * max(np.linalg.norm(flat), 1e-12))
        return self.library[int(np.argmax(sims))]

    def match(self, view: PastView) -> np.ndarray:
        """The best-matching calibration EAM for the request so far, as per-layer frequencies [Lm, E]."""
        cur = eam_of(
            view.prefill_routing(), view.past_routing(), view.routing(), view.num_slots, view.num_experts
        )
        return self.match_counts(cur)

    def scores(self, view: PastView) -> np.ndarray:
        """MoE-Infinity's prefetch priority [Lm, E]: matched frequencies x layer decay, past slots 0."""
        m = self.match(view)
        t = np.arange(view.num_slots)
        decay = np.where(t > view.j, 1.0 - (t - view.j) / (view.num_slots + 1), 0.0)
        return m * decay[:, None]

    def predict(self, view: PastView, d_max: int) -> np.ndarray:
        s = self.scores(view)
        return topk(s[view.j + 1 : view.j + 1 + d_max], view.top_k)


# ---------------------------------------------------------------------------------------------
# fMoE / FineMoE: expert maps
# ---------------------------------------------------------------------------------------------
class ExpertMapPredictor(Predictor):
    """fMoE's fine-grained expert maps (re-implementation; the matching rule is our reading).

    Store: for every decode iteration of every calibration request, its map (router probabilities,
    [Lm, E]) with the request's semantic key. fMoE embeds the prompt with a sentence model; we use
    the model's own mean input embedding of the prompt (no second model). At (n, j) for target
    t = j + d: s_sem = cosine(prompt key, request key); s_traj = cosine(this iteration's map rows
    0..j, a stored map's rows 0..j); blended s = a·s_sem + (1-a)·s_traj with a = d / Lm (more
    weight on semantics the further ahead, as ``prefetch_distance / num_layers`` in fMoE's code);
    the best stored map's row t gives the top-k.
    """

    name = "fmoe"

    def fit(self, calib: Sequence[Capture]) -> ExpertMapPredictor:
        if not calib:
            raise OdmoeError(
                "the fMoE predictor needs at least one calibration trace; set exp.calib_prompts >= 1"
            )
        maps, keys = [], []
        for c in calib:
            maps.append(c.decode["p"])
            keys.append(np.repeat(c.prompt_embedding[None], c.output_len, axis=0))
        self.maps = np.concatenate(maps).astype(np.float64)  # [M, Lm, E]
        keys = np.concatenate(keys).astype(np.float64)
        self.keys = keys / np.linalg.norm(keys, axis=1, keepdims=True).clip(min=1e-12)
        self.cum_sq = np.cumsum((self.maps**2).sum(axis=2), axis=1)  # [M, Lm] prefix squared norms
        return self

    def predict(self, view: PastView, d_max: int) -> np.ndarray:
        j, lm = view.j, view.num_slots
        traj = view.state("p").astype(np.float64)  # [j+1, E]
        dots = np.einsum("mle,le->m", self.maps[:, : j + 1], traj)
        s_traj = dots / np.sqrt(self.cum_sq[:, j] * float((traj**2).sum())).clip(min=1e-12)
        key = view.prompt_embedding().astype(np.float64)
        s_sem = self.keys @ (key / max(np.linalg.norm(key), 1e-12))
        out = []
        for d in range(1, min(d_max, lm - 1 - j) + 1):
            a = d / lm
            best = int(np.argmax(a * s_sem + (1 - a) * s_traj))
            out.append(topk(self.maps[best, j + d], view.top_k))
        return np.stack(out) if out else np.zeros((0, view.top_k), dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# ProMoE-style learned predictor
# ---------------------------------------------------------------------------------------------
class LearnedPredictor(Predictor):
    """Small MLPs u_j -> logits of slot j+d, one per (source slot j, d), trained on calibration traces.

    ProMoE trains a per-layer MLP on an earlier layer's hidden state (≈ h -> 512 -> E for h = 4096)
    with stride 2; here every d up to ``max_lookahead`` gets its own per-layer MLP so the whole
    recall-vs-d curve exists. Input: u_j (the router input, already normalized). Target: the
    multi-hot top-k of slot j+d (BCE; inferred). Training data: every prefill and decode position
    of the calibration prompts. All MLPs train together as one batched einsum (full Adam, seeded).
    """

    name = "learned"

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

    def fit(self, calib: Sequence[Capture]) -> LearnedPredictor:
        x, _, y = calibration_positions(calib, "u", self.name)  # [N, Lm, H], multi-hot [N, Lm, E]
        n, lm, h = x.shape
        e = y.shape[-1]
        dd = min(self.max_lookahead, lm - 1)
        target = torch.zeros(n, lm, dd, e)
        mask = torch.zeros(lm, dd, 1)
        for d in range(1, dd + 1):
            target[:, : lm - d, d - 1] = y[:, d:]
            mask[: lm - d, d - 1] = 1.0
        g = torch.Generator().manual_seed(self.seed)
        m = self.hidden
        self.w1 = (torch.randn(lm, dd, h, m, generator=g) / h**0.5).requires_grad_()
        self.b1 = torch.zeros(lm, dd, m, requires_grad=True)
        self.w2 = (torch.randn(lm, dd, m, e, generator=g) / m**0.5).requires_grad_()
        self.b2 = torch.zeros(lm, dd, e, requires_grad=True)
        params = [self.w1, self.b1, self.w2, self.b2]
        opt = torch.optim.Adam(params, lr=self.lr)
        for _ in range(self.steps):
            idx = torch.randint(0, n, (min(self.batch, n),), generator=g)
            logits = self._forward(x[idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target[idx], reduction="none")
            loss = (loss * mask).sum() / (mask.sum() * len(idx) * e)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.final_loss = float(loss.detach())
        for p in params:
            p.requires_grad_(False)
        self._np = [p.detach().numpy() for p in params]
        self.dd = dd
        return self

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        hid = torch.relu(torch.einsum("nlh,ldhm->nldm", x, self.w1) + self.b1)
        return torch.einsum("nldm,ldme->nlde", hid, self.w2) + self.b2

    def predict(self, view: PastView, d_max: int) -> np.ndarray:
        w1, b1, w2, b2 = self._np
        j = view.j
        dd = min(d_max, self.dd, view.num_slots - 1 - j)
        u = view.state("u")[j].astype(np.float32)
        hid = np.maximum(np.einsum("h,dhm->dm", u, w1[j, :dd]) + b1[j, :dd], 0)
        logits = np.einsum("dm,dme->de", hid, w2[j, :dd]) + b2[j, :dd]
        return topk(logits, view.top_k)


# ---------------------------------------------------------------------------------------------
# SEP
# ---------------------------------------------------------------------------------------------
class SEPPredictor(Predictor):
    """OD-MoE's SEP: the shadow's routing of slot j+d at iteration n is the prediction.

    The shadow (``odmoe.predict.sep.emulate``, token + KV alignment every iteration) decodes
    iteration n from o_n and the KV of o_1..o_{n-1} — all known when iteration n starts — so its
    whole routing of iteration n is available as soon as the shadow has run that far ahead.
    Recall counts agreement, not timeliness (PAPER.md §7), so the prediction of slot t is the same
    for every d: the curve is flat in d up to which target slots each d scores. Whether the shadow
    really is d layers ahead is a runtime question, not measured here.
    """

    def __init__(self, precision: str):
        self.precision = precision
        self.name = f"sep_{precision}"

    @property
    def source(self) -> str:
        return self.name

    def predict(self, view: PastView, d_max: int) -> np.ndarray:
        return view.extra(self.source, d_max)


BUILTIN = (
    "random load_after_routing oracle gate_h gate_x gate_u eam fmoe learned fate preattn moe_beyond".split()
)


def build_predictors(
    adapter: MoEAdapter,
    names: Sequence[str],
    *,
    max_lookahead: int = 8,
    seed: int = 0,
    learned: dict | None = None,
    eam_capacity: int | None = None,
    preattn: dict | None = None,
    moe_beyond: dict | None = None,
) -> list[Predictor]:
    """Predictors by name (see the module table); ``sep_<precision>`` needs captures with that source.
    ``learned``, ``preattn``, ``moe_beyond``: constructor arguments of those trained families."""
    bank = None
    out: list[Predictor] = []
    for name in names:
        if (name.startswith("gate_") or name == "fate") and bank is None:
            bank = RouterBank(adapter)
        if name == "random":
            out.append(RandomPredictor(seed))
        elif name == "load_after_routing":
            out.append(LoadAfterRouting())
        elif name == "oracle":
            out.append(Oracle())
        elif name in ("gate_h", "gate_x"):
            out.append(GatePredictor(bank, name[-1], renorm=True))
        elif name == "gate_u":
            out.append(GatePredictor(bank, "u", renorm=False))
        elif name == "eam":
            out.append(EAMPredictor(eam_capacity))
        elif name == "fmoe":
            out.append(ExpertMapPredictor())
        elif name == "learned":
            out.append(LearnedPredictor(max_lookahead=max_lookahead, seed=seed, **(learned or {})))
        elif name == "fate":
            out.append(GatePredictor(bank, "u", renorm=False, name="fate"))
        elif name == "preattn":
            out.append(PreAttentionPredictor(max_lookahead=max_lookahead, seed=seed, **(preattn or {})))
        elif name == "moe_beyond":
            out.append(MoEBeyondPredictor(max_lookahead=max_lookahead, seed=seed, **(moe_beyond or {})))
        elif name.startswith("sep_"):
            out.append(SEPPredictor(name[4:]))
        else:
            raise OdmoeError(
                f"unknown predictor {name!r}; use {', '.join(BUILTIN)} or sep_<fp16|int8|nf4|fp32>, "
                "or add your own with exp.extra_predictors (docs/extending.md)"
            )
    return out


def build_plugin_predictors(specs: Sequence, taken: Sequence[str] = ()) -> list[Predictor]:
    """User predictors from ``{_target_: mypkg.MyPredictor, <arguments>}`` specs (``exp.extra_predictors``).

    Each must subclass ``Predictor`` and implement ``predict``; its row name is its ``name`` attribute
    (the class name when it keeps the base's), distinct from every other predictor's. A plugin may not
    read the future (``uses_future``)."""
    from odmoe.plugins import instantiate

    out: list[Predictor] = []
    names = set(taken)
    for i, spec in enumerate(specs or []):
        where = f"exp.extra_predictors[{i}]"
        p = instantiate(spec, Predictor, ["predict"], where)
        if p.name == Predictor.name:
            p.name = type(p).__name__
        label = f"{where} ({type(p).__module__}.{type(p).__qualname__})"
        if not isinstance(p.name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", p.name):
            raise OdmoeError(
                f"{label}: name {p.name!r} must be letters, digits, _ . + or -; set another name"
            )
        if p.name in names:
            raise OdmoeError(
                f"{label}: a predictor named {p.name!r} is already in the run; give it another name"
            )
        if p.uses_future:
            raise OdmoeError(
                f"{label}: uses_future is reserved for the oracle; a plugin predicts from the past"
            )
        ml = p.max_lookahead
        if ml is not None and (isinstance(ml, bool) or not isinstance(ml, int) or ml < 1):
            raise OdmoeError(f"{label}: max_lookahead must be None or an integer >= 1, got {ml!r}")
        names.add(p.name)
        out.append(p)
    return out
