"""``+exp=pretrain``: train an embedded model and report perplexity and expert usage."""

from __future__ import annotations

import json

from odmoe.errors import OdmoeError
from odmoe.models.tiny import EMBEDDED, embedded_dir, is_trained, train_embedded
from odmoe.results import Run


def run(cfg, run: Run) -> dict:
    name = cfg.model.name
    if cfg.model.get("path") is not None or name not in EMBEDDED:
        raise OdmoeError(
            f"+exp=pretrain trains embedded models only ({', '.join(EMBEDDED)}); got model={name}"
        )
    if cfg.exp.force or not is_trained(name):
        summary = train_embedded(name)
    else:
        print(f"{name} is already trained in {embedded_dir(name)} (exp.force=true retrains it)")
        summary = json.loads((embedded_dir(name) / "train_summary.json").read_text())
    usage = run.table("expert_usage", key=["layer", "expert"])
    for layer, shares in enumerate(summary["expert_share"]):
        for expert, share in enumerate(shares):
            if not usage.done(layer=layer, expert=expert):
                usage.add({"layer": layer, "expert": expert, "share": share})
    print(
        f"{name}: held-out perplexity {summary['perplexity']:.2f} (unigram {summary['unigram_perplexity']:.1f})"
    )
    print(
        "per-layer expert-usage entropy (1 = uniform):",
        " ".join(f"{h:.3f}" for h in summary["usage_entropy"]),
    )
    return {
        "model": name,
        "model_dir": str(embedded_dir(name)),
        "parameters": summary["parameters"],
        "train_seconds": summary["train_seconds"],
        "train_tokens_seen": summary["train_tokens_seen"],
        "perplexity": summary["perplexity"],
        "unigram_perplexity": summary["unigram_perplexity"],
        "min_expert_share": summary["min_expert_share"],
        "experts_below_2pct": sum(share < 0.02 for shares in summary["expert_share"] for share in shares),
        "min_usage_entropy": summary["min_usage_entropy"],
        "mean_usage_entropy": sum(summary["usage_entropy"]) / len(summary["usage_entropy"]),
    }
