"""Reference decoding: equals Hugging Face greedy generation; traces round-trip; lengths are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from odmoe.data.prompts import embedded_prompts
from odmoe.errors import OdmoeError
from odmoe.trace import load_traces, reference_decode, reference_traces, save_trace


def test_reference_decode_matches_generate_and_records_routing(micro_mixtral):
    lm = micro_mixtral
    prompt = embedded_prompts(lm.tokenizer, 1, 12)[0]
    trace = reference_decode(lm.model, lm.adapter, prompt.id, prompt.token_ids, 10)
    with torch.no_grad():
        generated = lm.model.generate(torch.tensor([prompt.token_ids]), max_new_tokens=10, do_sample=False)
    assert trace.tokens.tolist() == generated[0, 12:].tolist()
    a = lm.adapter
    assert trace.prefill_experts.shape == (12, a.num_moe_layers, a.top_k)
    assert trace.decode_experts.shape == (10, a.num_moe_layers, a.top_k)
    # the recorded routing is the router's own top-k (Mixtral: top-k of its logits)
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([prompt.token_ids]), output_router_logits=True)
    for slot, logits in enumerate(out.router_logits):
        expected = torch.topk(logits, a.top_k, dim=-1).indices.sort(-1).values.numpy()
        np.testing.assert_array_equal(np.sort(trace.prefill_experts[:, slot], -1), expected)
    np.testing.assert_allclose(trace.decode_weights.sum(-1), 1.0, rtol=1e-5)  # Mixtral renormalises top-2


def test_trace_round_trip_and_resume(micro_mixtral, tmp_path):
    lm = micro_mixtral
    prompts = embedded_prompts(lm.tokenizer, 2, 8)
    first = reference_traces(lm.model, lm.adapter, prompts, 5, tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.parquet")}
    again = reference_traces(lm.model, lm.adapter, prompts, 5, tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.parquet")} == mtimes  # nothing recomputed
    loaded = {t.prompt_id: t for t in load_traces(tmp_path)}
    for t in first + again:
        u = loaded[t.prompt_id]
        for field in (
            "prompt",
            "tokens",
            "prefill_experts",
            "decode_experts",
            "decode_weights",
            "prefill_weights",
        ):
            np.testing.assert_array_equal(getattr(t, field), getattr(u, field))
        assert u.moe_layers == tuple(lm.adapter.moe_layers)
    save_trace(first[0], tmp_path / "other")
    assert len(load_traces(tmp_path / "other")) == 1


def test_lengths_are_checked(micro_mixtral):
    lm = micro_mixtral
    limit = lm.model.config.max_position_embeddings
    with pytest.raises(OdmoeError, match="exceed the model's context"):
        reference_decode(lm.model, lm.adapter, "p", [1] * (limit - 2), 5)
    with pytest.raises(OdmoeError, match="must be positive"):
        reference_decode(lm.model, lm.adapter, "p", [1, 2], 0)
    with pytest.raises(OdmoeError, match="no routing traces"):
        load_traces("/nonexistent-dir")
