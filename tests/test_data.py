"""Corpus splits and prompt sets."""

from __future__ import annotations

import pytest

from odmoe.data.corpus import SPLITS, chapters, split_chapters
from odmoe.data.prompts import embedded_prompts, load_prompts
from odmoe.errors import OdmoeError


def test_splits_partition_the_corpus():
    parts = {s: split_chapters(s) for s in SPLITS}
    assert sum(len(p) for p in parts.values()) == len(chapters()) == 1189
    assert len(parts["eval"]) >= 25 and len(parts["calib"]) >= 25
    assert not set(parts["eval"]) & set(parts["train"])
    assert not set(parts["eval"]) & set(parts["calib"])


def test_prompts_have_exact_length_and_disjoint_splits(micro_mixtral):
    tok = micro_mixtral.tokenizer
    evals = embedded_prompts(tok, 40, 16)
    calib = embedded_prompts(tok, 10, 16, split="calib")
    assert len(evals) == 40 and all(len(p.token_ids) == 16 for p in evals)
    assert len({p.id for p in evals}) == 40
    assert not {p.token_ids for p in evals} & {p.token_ids for p in calib}
    assert embedded_prompts(tok, 5, 16) == evals[:5]  # deterministic


def test_bad_prompt_requests(micro_mixtral):
    from omegaconf import OmegaConf

    tok = micro_mixtral.tokenizer
    with pytest.raises(OdmoeError, match="positive"):
        load_prompts(OmegaConf.create({"source": "embedded"}), tok, 16, 0)
    with pytest.raises(OdmoeError, match="holds only"):
        embedded_prompts(tok, 10_000, 128)
    with pytest.raises(OdmoeError, match="unknown prompt source"):
        load_prompts(OmegaConf.create({"source": "nope"}), tok, 16, 1)
    with pytest.raises(OdmoeError, match="not available offline"):
        load_prompts(OmegaConf.create({"source": "alpaca", "path": "/nonexistent.jsonl"}), tok, 16, 1)
