"""The decoding rule reaches every place that picks a token, and equals transformers' own generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from odmoe.data.prompts import embedded_prompts
from odmoe.decoding import set_decode_rule
from odmoe.errors import OdmoeError
from odmoe.models import load_model
from odmoe.predict.sep import Alignment, emulate, record_reference
from odmoe.predict.shadow import build_shadow
from odmoe.trace import reference_decode

OUT = 24
RULE = {"no_repeat_ngram_size": 2}


def _has_repeated_ngram(tokens: list[int], n: int, start: int = 0) -> bool:
    """Whether an n-gram ending at or after ``start`` occurred earlier in ``tokens``."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return any(grams[i] in grams[:i] for i in range(max(0, start - n + 1), len(grams)))


def test_rule_matches_generate_and_changes_the_output(micro_mixtral_dir):
    lm = load_model("micro-mixtral", device="cpu")
    (p,) = embedded_prompts(lm.tokenizer, 1, 12)
    ids = list(p.token_ids)
    plain = reference_decode(lm.model, lm.adapter, p.id, p.token_ids, OUT).tokens.tolist()
    assert _has_repeated_ngram(plain, 2)  # plain greedy repeats itself on this model
    set_decode_rule(lm.model, RULE)
    ruled = reference_decode(lm.model, lm.adapter, p.id, p.token_ids, OUT).tokens.tolist()
    assert not _has_repeated_ngram(ids + ruled, 2, start=len(ids))
    assert ruled != plain
    with torch.no_grad():
        generated = lm.model.generate(torch.tensor([p.token_ids]), max_new_tokens=OUT, do_sample=False)
    assert ruled == generated[0, 12:].tolist()


def test_unaligned_exact_shadow_follows_the_rule(micro_mixtral_dir):
    """An fp32 shadow without any alignment picks its own tokens: with the rule applied on its own
    history it regenerates the reference exactly (recall 1.0)."""
    lm = load_model("micro-mixtral", device="cpu", decode=RULE)
    (p,) = embedded_prompts(lm.tokenizer, 1, 12)
    record = record_reference(lm.model, lm.adapter, p.id, p.token_ids, OUT)
    shadow = build_shadow(lm.model, lm.adapter, "fp32")
    em = emulate(shadow, record, Alignment(None, None))
    np.testing.assert_array_equal(em.inputs, record.trace.tokens)
    np.testing.assert_array_equal(em.experts, record.trace.decode_experts)


def test_bad_rule_is_refused(micro_mixtral_dir):
    with pytest.raises(OdmoeError, match="unknown model.decode keys"):
        load_model("micro-mixtral", device="cpu", decode={"top_p": 0.9})
    with pytest.raises(OdmoeError, match="no_repeat_ngram_size >= 0"):
        load_model("micro-mixtral", device="cpu", decode={"no_repeat_ngram_size": -1})
