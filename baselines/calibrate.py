"""Offline calibration shared by the policies that fit something, always on the corpus's *calibration*
split, never the evaluation prompts:

* :func:`calibration_traces`: fp32 reference decodes of calibration prompts (routing of prefill and
  decode), cached on the loaded model so several systems share one pass.
* :func:`moe_sensitivity`: AdapMoE's per-layer sensitivity to dropping the second expert (with the
  gradient of the language-model loss), the gate weights it is applied to, and the next-layer gate's
  prediction accuracy — the inputs of its adaptive gating and of its cache-allocation DP.
* :func:`eam_collection`: MoE-Infinity's offline expert-activation-matrix collection, one matrix per
  traced calibration request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from baselines.predict import topk_route
from odmoe.data.corpus import split_chapters
from odmoe.data.prompts import embedded_prompts
from odmoe.models.adapter import eager_experts_forward, swiglu_expert
from odmoe.models.load import LoadedModel
from odmoe.trace import RoutingRecorder, Trace, reference_decode


def calibration_traces(
    lm: LoadedModel, num: int = 2, prompt_len: int = 32, output_len: int = 48
) -> list[Trace]:
    """Reference routing of ``num`` calibration prompts (computed once per loaded model)."""
    key = (num, prompt_len, output_len)
    cache = lm.__dict__.setdefault("_baselines_calib", {})
    if key not in cache:
        prompts = embedded_prompts(lm.tokenizer, num, prompt_len, split="calib")
        cache[key] = [reference_decode(lm.model, lm.adapter, p.id, p.token_ids, output_len) for p in prompts]
    return cache[key]


@dataclass
class Sensitivity:
    """Per MoE layer (slot): ``sensitivity`` S_l (nats per unit squared second-expert weight),
    ``second_weights`` the calibration tokens' renormalized second gate weights [N, L], and
    ``prefetch_accuracy`` the share of tokens whose layer-l top-1 expert predicted by layer l's gate on
    layer l-1's state is among the layer's routed experts (0 for the first layer)."""

    sensitivity: np.ndarray
    second_weights: np.ndarray
    prefetch_accuracy: np.ndarray
    tokens: int


def _expert_difference(adapter, layer: int, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """E_first(x_t) - E_second(x_t) per token [T, H]: what dropping the second expert removes, per unit
    of its renormalized weight (w1 E1 + w2 E2 -> E1 changes the output by w2 (E1 - E2))."""
    act = adapter.experts(layer).act_fn
    out = torch.zeros_like(x)
    for slot, sign in ((0, 1.0), (1, -1.0)):
        for e in torch.unique(idx[:, slot]).tolist():
            rows = torch.where(idx[:, slot] == e)[0]
            w = adapter.expert_weights(layer, e)
            out[rows] += sign * swiglu_expert(x[rows], w.gate_up, w.down, act)
    return out


def moe_sensitivity(lm: LoadedModel, num: int = 8, seq_len: int = 128) -> Sensitivity:
    """AdapMoE's layer sensitivity (arXiv 2408.10284, adaptive sensitivity-based expert gating) on ``num``
    calibration windows of ``seq_len`` tokens, teacher-forced.

    Dropping token t's second expert at layer l changes the layer's output by Δ = w2 d_t with
    d_t = E1(u_t) - E2(u_t). To second order, with the Hessian of the loss approximated by the
    empirical Fisher information g gᵀ (g = ∂L/∂ output, L the summed next-token NLL), the loss grows by
    ½ w2² (g_t · d_t)²; the layer's sensitivity is S_l = ½ E_t[(g_t · d_t)²], so that a drop costs
    w2² S_l. Cached on the loaded model per (num, seq_len)."""
    key = ("sensitivity", num, seq_len)
    cache = lm.__dict__.setdefault("_baselines_calib", {})
    if key in cache:
        return cache[key]
    adapter, model = lm.adapter, lm.model
    slots = {layer: s for s, layer in enumerate(adapter.moe_layers)}
    windows = embedded_prompts(lm.tokenizer, num, seq_len, split="calib")
    device = next(model.parameters()).device
    sq, w2, hit = [[] for _ in slots], [[] for _ in slots], np.zeros(len(slots))
    seen: dict[int, tuple] = {}  # layer -> (output, d, u, top-k index, top-k weights) of the window

    def hook(layer):
        def forward(module, hidden, top_k_index, top_k_weights):
            out = eager_experts_forward(module, hidden, top_k_index, top_k_weights)
            with torch.no_grad():
                d = _expert_difference(adapter, layer, hidden.detach(), top_k_index)
            seen[layer] = (out, d, hidden.detach(), top_k_index.detach(), top_k_weights.detach())
            return out

        return forward

    for layer in slots:
        adapter.set_experts_forward(layer, hook(layer))
    try:
        for win in windows:
            ids = torch.as_tensor(win.token_ids, device=device)[None]
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
            with torch.enable_grad():
                logits = model(inputs_embeds=embeds, use_cache=False).logits[0, :-1]
                loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum")
                grads = torch.autograd.grad(loss, [seen[layer][0] for layer in slots])
            for (layer, s), g in zip(slots.items(), grads, strict=True):
                _, d, _, idx, w = seen[layer]
                sq[s].append(((g * d).sum(-1) ** 2).double().cpu())
                w2[s].append((w[:, 1] / w[:, :2].sum(-1)).cpu())
                if s > 0:
                    u_prev = seen[adapter.moe_layers[s - 1]][2]
                    _, pred = topk_route(u_prev @ adapter.router(layer).weight.detach().T, 1)
                    hit[s] += float((pred == idx).any(-1).sum())
            seen.clear()
    finally:
        adapter.clear_experts_forward()
    tokens = sum(len(w.token_ids) for w in windows)
    out = Sensitivity(
        sensitivity=np.array([0.5 * float(torch.cat(v).mean()) for v in sq]),
        second_weights=np.stack([torch.cat(v).numpy() for v in w2], axis=1),
        prefetch_accuracy=hit / tokens,
        tokens=tokens,
    )
    cache[key] = out
    return out


def calibration_windows(tokenizer, length: int, num: int) -> list[tuple[int, ...]]:
    """Up to ``num`` non-overlapping ``length``-token windows of the calibration chapters, in order."""
    out = []
    for text in split_chapters("calib"):
        ids = tokenizer(text)["input_ids"]
        for start in range(0, len(ids) - length + 1, length):
            out.append(tuple(ids[start : start + length]))
            if len(out) == num:
                return out
    return out


@torch.no_grad()
def eam_collection(lm: LoadedModel, num: int, prompt_len: int = 32, output_len: int = 32) -> np.ndarray:
    """MoE-Infinity's offline trace (arXiv 2401.14361, expert activation tracing; ``load_trace`` in
    ``moe_infinity/memory/expert_tracer.py``): one expert activation matrix [L, E] (tokens routed to each
    expert, prompt and continuation) per calibration request -> [n, L, E], n = ``num`` or every window the
    calibration split holds if fewer. A request is a calibration window of ``prompt_len + output_len`` tokens
    run teacher-forced in one forward pass: the routing of the corpus's own continuation stands in for the
    model's generated tokens (one pass per request keeps a collection of 1000 requests to seconds). Cached on
    the loaded model."""
    key = ("eamc", num, prompt_len, output_len)
    cache = lm.__dict__.setdefault("_baselines_calib", {})
    if key not in cache:
        adapter = lm.adapter
        device = next(lm.model.parameters()).device
        windows = calibration_windows(lm.tokenizer, prompt_len + output_len, num)
        recorder = RoutingRecorder(adapter)
        out = np.zeros((len(windows), adapter.num_moe_layers, adapter.num_experts))
        with recorder.installed():
            for n, win in enumerate(windows):
                lm.model(input_ids=torch.as_tensor(win, device=device)[None], use_cache=False)
                experts, _ = recorder.pop()  # [T, L, k]
                for s in range(experts.shape[1]):
                    np.add.at(out[n, s], experts[:, s].reshape(-1), 1)
        cache[key] = out
    return cache[key]
