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

Training checkpoints every ``CHECKPOINT_EVERY`` steps and when SIGINT or SIGTERM arrives (the signal is
deferred to the end of the running step, ``odmoe.signals.deferred``) into ``.<name>.checkpoint/`` beside
the model: weights, AdamW state and the batch sampler's RNG state as safetensors (never pickled), the
tokenizer, and the log so far. Training again resumes there and produces the same model as an
uninterrupted run (same batches, same optimizer state); a checkpoint of another recipe is ignored.
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

from odmoe import signals
from odmoe.data.corpus import split_chapters
from odmoe.data.tokenizer import train_tokenizer
from odmoe.errors import OdmoeError
from odmoe.models.adapter import MoEAdapter
from odmoe.paths import odmoe_home

CHECKPOINT_EVERY = 25  # training steps between checkpoints (a kill -9 loses at most this many)


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


def checkpoint_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.checkpoint"


def _save_checkpoint(where: Path, model, optim, gen: torch.Generator, tokenizer, state: dict) -> None:
    """Weights, AdamW moments and the sampler's RNG as safetensors + ``state.json``; replaced atomically."""
    from safetensors.torch import save_file

    tmp = where.with_name(where.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {}
    for p, st in optim.state.items():
        for key, value in st.items():
            moments[f"{names[id(p)]}::{key}"] = torch.as_tensor(value).contiguous()
    moments["::rng"] = gen.get_state()
    save_file(moments, tmp / "optimizer.safetensors")
    tokenizer.save_pretrained(tmp / "tokenizer")
    (tmp / "state.json").write_text(json.dumps(state) + "\n")
    shutil.rmtree(where, ignore_errors=True)
    tmp.rename(where)


def _load_checkpoint(where: Path, spec: EmbeddedSpec) -> dict | None:
    """The checkpoint's state (with ``tokenizer``) when it was made with this recipe, else None."""
    try:
        state = json.loads((where / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if state.get("spec") != json.loads(json.dumps(asdict(spec))):
        return None
    from transformers import PreTrainedTokenizerFast

    state["tokenizer"] = PreTrainedTokenizerFast.from_pretrained(where / "tokenizer")
    return state


def _restore(where: Path, model, optim, gen: torch.Generator) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(where / "model.safetensors"))
    moments = load_file(where / "optimizer.safetensors")
    gen.set_state(moments.pop("::rng"))
    params = dict(model.named_parameters())
    for key, value in moments.items():
        name, what = key.split("::")
        # moments beside their parameter; AdamW keeps `step` on the host (capturable=False)
        optim.state[params[name]][what] = value if what == "step" else value.to(params[name].device)


def train_embedded(
    name: str, out_dir: Path | None = None, progress: bool = True, device: str = "cpu"
) -> dict[str, Any]:
    """Train embedded model ``name`` on ``device`` and store it in ``out_dir`` (default: the cache). Returns
    its summary.

    Resumes from the checkpoint a SIGINT/SIGTERM (or a kill) left behind (module docstring). The recipe is
    the same on every device (same seed, batches and steps); a model trained on a GPU differs from a
    CPU-trained one only by floating-point rounding. On CUDA the experts train with the eager loop:
    transformers' ``grouped_mm`` path, the CPU's fastest, has CUDA kernels whose fp32 support this project
    has not checked."""
    spec = EMBEDDED[name]
    dev = torch.device(device)
    final = Path(out_dir) if out_dir else embedded_dir(name)
    ckpt = checkpoint_dir(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    t0 = time.perf_counter()

    train_texts = split_chapters("train")[: spec.train_chapters]
    resumed = _load_checkpoint(ckpt, spec)
    tokenizer = resumed["tokenizer"] if resumed else train_tokenizer(train_texts, spec.vocab_size)
    train_tokens = _token_stream(tokenizer, train_texts)
    eval_tokens = _token_stream(tokenizer, split_chapters("eval"))

    config = build_config(spec, len(tokenizer), tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(dev)
    adapter = MoEAdapter(model)
    # grouped_mm: fastest on CPU for training; eval uses the odmoe hook
    model.set_experts_implementation("grouped_mm" if dev.type == "cpu" else "eager")
    optim = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(spec.seed)
    log_rows: list[dict] = []
    first, before = 0, 0.0
    if resumed:
        _restore(ckpt, model, optim, gen)
        first, before, log_rows = resumed["step"], resumed["elapsed_s"], resumed["log"]
        print(f"odmoe: resuming the training of {name} at step {first} of {spec.steps}", file=sys.stderr)

    def checkpoint(step: int) -> None:
        state = {"step": step, "elapsed_s": before + time.perf_counter() - t0, "log": log_rows}
        _save_checkpoint(ckpt, model, optim, gen, tokenizer, state | {"spec": asdict(spec)})

    model.train()
    steps = range(first, spec.steps)
    bar = tqdm(
        steps, desc=f"train {name}", initial=first, total=spec.steps, disable=not progress, file=sys.stderr
    )
    with signals.deferred() as stop:
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
                tokens=(step + 1) * spec.batch_size * spec.seq_len,
                elapsed_s=round(before + time.perf_counter() - t0, 2),
            )
            log_rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if stop.pending() or (step + 1) % CHECKPOINT_EVERY == 0:
                checkpoint(step + 1)
            if stop.pending():
                bar.close()
                stop.raise_if_pending()
        bar.close()
        if first < spec.steps and spec.steps % CHECKPOINT_EVERY:
            checkpoint(spec.steps)  # an interrupt during the evaluation below resumes after training
    train_s = before + time.perf_counter() - t0

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
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_model(tmp, final, model, tokenizer, log_rows, summary)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(ckpt, ignore_errors=True)
    return summary


def _write_model(tmp: Path, final: Path, model, tokenizer, log_rows: list[dict], summary: dict) -> None:
    """Write the trained model into ``tmp`` and rename it to ``final`` (never a half-written model)."""
    tmp.mkdir(parents=True)
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
