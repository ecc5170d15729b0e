"""SEP as a predictor in the lookahead harness: only past information, flat in d."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from odmoe.data.prompts import embedded_prompts
from odmoe.models import load_model
from odmoe.predict.harness import capture_reference, hits_by_d, predictions, scramble_after
from odmoe.predict.predictors import SEPPredictor
from odmoe.predict.sep import Alignment, ReferenceRecord, emulate
from odmoe.predict.shadow import build_shadow

OUT = 8


def test_sep_uses_only_what_iteration_n_knows(micro_mixtral_dir):
    """Scrambling the full model's tokens after o_n and its KV from o_n on leaves the shadow's
    routing of iterations 1..n unchanged (token + KV alignment every iteration)."""
    lm = load_model("micro-mixtral", device="cpu")
    (p,) = embedded_prompts(lm.tokenizer, 1, 12, "eval")
    capture, record = capture_reference(lm.model, lm.adapter, p.id, p.token_ids, OUT)
    shadow = build_shadow(lm.model, lm.adapter, "fp16")
    base = emulate(shadow, record, Alignment(1, 1)).experts
    n = 4
    gen = torch.Generator().manual_seed(0)
    tokens = record.trace.tokens.copy()
    tokens[n:] = np.random.default_rng(0).integers(0, lm.model.config.vocab_size, size=OUT - n)
    kv = [
        (
            torch.cat([k[: n - 1], torch.randn(k[n - 1 :].shape, generator=gen)]),
            torch.cat([v[: n - 1], torch.randn(v[n - 1 :].shape, generator=gen)]),
        )
        for k, v in record.decode_kv
    ]
    scrambled = ReferenceRecord(replace(record.trace, tokens=tokens), record.prompt_kv, kv)
    other = emulate(shadow, scrambled, Alignment(1, 1)).experts
    np.testing.assert_array_equal(other[:n], base[:n])
    assert (other[n:] != base[n:]).any()  # the scrambled future did reach the shadow

    # in the harness: SEP predicts slot j+d of iteration n with the shadow's routing of that slot
    capture.extra["sep_fp16"] = base
    sep = SEPPredictor("fp16")
    pr = predictions(sep, capture, 3)
    assert (pr[2, 0, 1] == base[2, 2]).all()
    scr = predictions(sep, scramble_after(capture, 3, 0, seed=2), 3)
    np.testing.assert_array_equal(scr[2, 0], pr[2, 0])
    # agreement, not timeliness: every d scores the same shadow routing of its target slot
    rows = {r["d"]: r["hits"] / r["slots"] for r in hits_by_d(sep, pr, capture)}
    assert rows[1] > 0.8 and abs(rows[1] - rows[3]) < 0.1
