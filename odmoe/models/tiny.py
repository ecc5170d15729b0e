"""Embedded MoE models, trained by the project on the embedded corpus.

``tiny-mixtral`` is the default model of every experiment: Mixtral architecture, 16 layers (so four
worker groups still leave the shadow room to run ahead), 8 experts, top-2, trained for about ten
minutes on two CPU cores. ``tiny-qwen2moe`` exercises another family (a gated shared expert,
16 experts, top-4). The ``micro-*`` variants train in seconds and back the tests.

Routing must not collapse: every model is trained with a per-layer load-balancing loss
(``per_layer_balance_loss``) and the training summary reports each expert's share of the routed
tokens per layer (the least share must stay above 2%).

A trained model lives in ``$ODMOE_HOME/models/<name>/``: ``model.safetensors``, ``config.json``, the
tokenizer, ``train_log.csv`` and ``train_summary.json``. It is written to a temporary directory
and renamed into place, so a half-trained model never looks complete.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from odmoe.data.corpus import split_chapters
from odmoe.data.tokenizer import train_tokenizer
from odmoe.errors import OdmoeError
from odmoe.models.adapter import MoEAdapter
from odmoe.paths import odmoe_home


@dataclass(frozen=True)
class EmbeddedSpec:
    """Architecture and training recipe of one embedded model."""

    model_type: str
    config: dict[str, Any]
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 20
    aux_loss_coef: float = 0.05
    train_chapters: int | None = None  # None: the whole training split
    eval_windows: int = 64
    seed: int = 0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_ATTN = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=1024)
_MICRO_ATTN = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512)

EMBEDDED: dict[str, EmbeddedSpec] = {
    "tiny-mixtral": EmbeddedSpec(
        "mixtral",
        dict(
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            **_ATTN,
        ),
    ),
    "tiny-qwen2moe": EmbeddedSpec(
        "qwen2_moe",
        dict(
            hidden_size=96,
            intermediate_size=192,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=192,
            num_hidden_layers=12,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            **_ATTN,
        ),
        steps=250,
    ),
    "micro-mixtral": EmbeddedSpec(
        "mixtral",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_local_experts=8,
            num_experts_per_tok=2,
            **_MICRO_ATTN,
        ),
        vocab_size=512,
        seq_len=64,
        batch_size=8,
        steps=150,
        train_chapters=60,
        eval_windows=16,
    ),
    "micro-qwen2moe": EmbeddedSpec(
        "qwen2_moe",
        dict(
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_hidden_layers=4,
            num_experts=8,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            **_MICRO_ATTN,
        ),
        vocab_size=512,
        seq_len=64,
        batch_size=8,
        steps=150,
        train_chapters=60,
        eval_windows=16,
    ),
}


def embedded_dir(name: str) -> Path:
    return odmoe_home() / "models" / name


def is_trained(name: str) -> bool:
    return (embedded_dir(name) / "train_summary.json").exists()


def ensure_embedded(name: str) -> Path:
    """The directory of embedded model ``name``, training it first if it is not in the cache."""
    if name not in EMBEDDED:
        raise OdmoeError(f"unknown embedded model {name!r}; choose one of {', '.join(EMBEDDED)}")
    if not is_trained(name):
        print(
            f"odmoe: embedded model {name} not found in {embedded_dir(name)}; training it now",
            file=sys.stderr,
        )
        train_embedded(name)
    return embedded_dir(name)


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style load balance, E * sum_e f_e * P_e, averaged over layers (1.0 when balanced).

    Transformers' own ``load_balancing_loss_func`` concatenates all layers before balancing, which
    balances each expert index summed over layers and lets single layers collapse; we balance
    every layer on its own.
    """
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
        losses.append(probs.shape[-1] * (chosen.mean(0) / top_k * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def _lr_at(step: int, spec: EmbeddedSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, adapter: MoEAdapter, tokens: torch.Tensor, seq_len: int, windows: int) -> dict[str, Any]:
    """Held-out perplexity and per-layer expert shares over non-overlapping windows."""
    counts = torch.zeros(adapter.num_moe_layers, adapter.num_experts, dtype=torch.long, device=tokens.device)

    def counter(slot: int):
        def record(module, hidden, top_k_index, top_k_weights):
            counts[slot] += torch.bincount(top_k_index.flatten(), minlength=adapter.num_experts)
            return None

        return record

    from odmoe.models.adapter import eager_experts_forward

    for slot, layer in enumerate(adapter.moe_layers):
        rec = counter(slot)
        adapter.set_experts_forward(
            layer, lambda m, h, i, w, rec=rec: rec(m, h, i, w) or eager_experts_forward(m, h, i, w)
        )
    model.eval()
    nll, n = 0.0, 0
    n_windows = min(windows, (len(tokens) - 1) // seq_len)
    for w in range(n_windows):
        x = tokens[w * seq_len : (w + 1) * seq_len + 1]
        logits = model(input_ids=x[None, :-1]).logits[0]
        nll += torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum").item()
        n += seq_len
    adapter.clear_experts_forward()
    counts = counts.cpu()
    share = counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)
    entropy = -(share * share.clamp(min=1e-12).log()).sum(-1) / math.log(adapter.num_experts)
    return {
        "eval_tokens": n,
        "perplexity": math.exp(nll / n),
        "expert_share": share.tolist(),
        "min_expert_share": share.min().item(),
        "usage_entropy": entropy.tolist(),
        "min_usage_entropy": entropy.min().item(),
    }


def unigram_perplexity(train: torch.Tensor, held_out: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model: the floor a trained LM must beat by far."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[held_out].mean().item())


def build_config(spec: EmbeddedSpec, vocab_size: int, eos_id: int):
    return AutoConfig.for_model(
        spec.model_type,
        vocab_size=vocab_size,
        tie_word_embeddings=False,
        router_aux_loss_coef=spec.aux_loss_coef,
        output_router_logits=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        **spec.config,
    )


def train_embedded(
    name: str, out_dir: Path | None = None, progress: bool = True, device: str = "cpu"
) -> dict[str, Any]:
    """Train embedded model ``name`` on ``device`` and store it in ``out_dir`` (default: the cache). Returns
    its summary.

    The recipe is the same on every device (same seed, batches and steps); a model trained on a GPU differs
    from a CPU-trained one only by floating-point rounding, so its measurements are not the README's to the
    last digit. On CUDA the experts train with the eager loop: transformers' ``grouped_mm`` path, the CPU's
    fastest, has CUDA kernels whose fp32 support this project has not checked."""
    spec = EMBEDDED[name]
    dev = torch.device(device)
    final = Path(out_dir) if out_dir else embedded_dir(name)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(spec.seed)
    t0 = time.perf_counter()

    train_texts = split_chapters("train")[: spec.train_chapters]
    tokenizer = train_tokenizer(train_texts, spec.vocab_size)
    train_tokens = _token_stream(tokenizer, train_texts)
    eval_tokens = _token_stream(tokenizer, split_chapters("eval"))

    config = build_config(spec, len(tokenizer), tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(dev)
    adapter = MoEAdapter(model)
    # grouped_mm: fastest on CPU for training; eval uses the odmoe hook
    model.set_experts_implementation("grouped_mm" if dev.type == "cpu" else "eager")
    optim = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(spec.seed)
    log_rows = []
    model.train()
    bar = tqdm(range(spec.steps), desc=f"train {name}", disable=not progress, file=sys.stderr)
    for step in bar:
        starts = torch.randint(0, len(train_tokens) - spec.seq_len, (spec.batch_size,), generator=gen)
        batch = torch.stack([train_tokens[s : s + spec.seq_len] for s in starts.tolist()]).to(dev)
        for group in optim.param_groups:
            group["lr"] = _lr_at(step, spec)
        out = model(input_ids=batch, output_router_logits=True)
        ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        aux = per_layer_balance_loss(out.router_logits, adapter.top_k)
        loss = ce + spec.aux_loss_coef * aux
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        aux = out.aux_loss.item() if out.aux_loss is not None else float("nan")
        row = dict(
            step=step, loss=round(loss.item(), 5), aux_loss=round(aux, 5), lr=round(_lr_at(step, spec), 7)
        )
        row.update(
            tokens=(step + 1) * spec.batch_size * spec.seq_len, elapsed_s=round(time.perf_counter() - t0, 2)
        )
        log_rows.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
    train_s = time.perf_counter() - t0

    model.set_experts_implementation("odmoe")
    metrics = evaluate(model, adapter, eval_tokens.to(dev), spec.seq_len, spec.eval_windows)
    model.to("cpu")
    summary = {
        "name": name,
        "model_type": spec.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens_seen": spec.steps * spec.batch_size * spec.seq_len,
        "train_corpus_tokens": len(train_tokens),
        "train_seconds": round(train_s, 1),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "unigram_perplexity": unigram_perplexity(train_tokens, eval_tokens, len(tokenizer)),
        "spec": asdict(spec),
        **metrics,
    }
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with (tmp / "train_log.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(log_rows[0]))
        writer.writeheader()
        writer.writerows(log_rows)
    (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return summary
