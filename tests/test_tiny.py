"""Embedded-model training: what it stores, and that it learns."""

from __future__ import annotations

import json

import pytest

from odmoe.errors import OdmoeError
from odmoe.models import load_model
from odmoe.models.tiny import EMBEDDED, ensure_embedded


def test_micro_model_is_stored_complete_and_learns(micro_mixtral_dir):
    files = {p.name for p in micro_mixtral_dir.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "train_log.csv",
        "train_summary.json",
    } <= files
    assert not any(p.suffix in {".bin", ".pt", ".pkl"} for p in micro_mixtral_dir.iterdir())
    summary = json.loads((micro_mixtral_dir / "train_summary.json").read_text())
    assert summary["perplexity"] < 0.8 * summary["unigram_perplexity"]
    assert len(summary["expert_share"]) == EMBEDDED["micro-mixtral"].config["num_hidden_layers"]
    for shares in summary["expert_share"]:
        assert sum(shares) == pytest.approx(1.0)
    assert summary["min_expert_share"] >= 0.02  # the per-layer balance loss: no expert collapses


def test_per_layer_balance_loss_penalises_a_collapsed_layer():
    import torch

    from odmoe.models.tiny import per_layer_balance_loss

    torch.manual_seed(0)
    balanced = torch.randn(4096, 8) * 0.01
    collapsed = balanced.clone()
    collapsed[:, :2] += 10.0  # every token picks experts 0 and 1
    assert per_layer_balance_loss((balanced,), 2).item() == pytest.approx(1.0, abs=0.02)
    # one collapsed layer raises the mean although the two layers together use every expert
    mixed = per_layer_balance_loss((balanced, collapsed), 2).item()
    assert mixed > 1.5


def test_second_family_trains_and_loads(micro_qwen2moe):
    a = micro_qwen2moe.adapter
    assert a.model_type == "qwen2_moe" and a.num_shared_experts == 1 and a.top_k == 4


def test_unknown_embedded_model():
    with pytest.raises(OdmoeError, match="unknown embedded model"):
        ensure_embedded("giant-mixtral")
    with pytest.raises(OdmoeError, match="is not embedded"):
        load_model("giant-mixtral")
