"""Fast SEP replays against the sequential reference ``emulate``, on the micro models.

The batched replay and batched references (prompts of one length) are the batch-1 ones bit for bit
at every precision (``odmoe.models.rowexact``). The parallel pass (token period 1) gives exactly
``emulate``'s routing and tokens for fp32 shadows, and recall within 0.001 of it for fp16/int8/nf4
(its products have other shapes, so they round differently).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from odmoe.errors import OdmoeError
from odmoe.metrics import hits
from odmoe.predict import build_shadow
from odmoe.predict.sep import (
    Alignment,
    emulate,
    emulate_batch,
    kv_sources,
    parallel_blocker,
    record_reference,
    record_references,
    replay,
    replay_parallel,
)

PROMPTS = [
    ("a", (7, 42, 99, 3, 250, 11, 64, 301)),
    ("b", (5, 6, 7, 8, 9, 10)),
    ("c", (400, 3, 77, 12, 8, 1, 2, 9)),  # a's length: a and c share a batch, b runs alone
]
OUT = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def _records(lm, prompts=PROMPTS, out=OUT):
    return [record_reference(lm.model, lm.adapter, pid, p, out) for pid, p in prompts]


def _same(ref, fast, exact: bool = False) -> None:
    np.testing.assert_array_equal(fast.experts, ref.experts)
    np.testing.assert_array_equal(fast.inputs, ref.inputs)
    np.testing.assert_array_equal(fast.own_tokens, ref.own_tokens)
    np.testing.assert_array_equal(fast.token_aligned, ref.token_aligned)
    np.testing.assert_array_equal(fast.kv_aligned, ref.kv_aligned)
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(ref.cache.layers, fast.cache.layers, strict=True):  # the cache emulate ends with
        torch.testing.assert_close(b.keys, a.keys, **tol)
        torch.testing.assert_close(b.values, a.values, **tol)


def test_batched_reference_recording_equals_one_prompt_at_a_time(micro_mixtral):
    one = _records(micro_mixtral)
    batch = record_references(micro_mixtral.model, micro_mixtral.adapter, PROMPTS, OUT)
    for a, b in zip(one, batch, strict=True):
        assert a.trace.prompt_id == b.trace.prompt_id
        np.testing.assert_array_equal(b.trace.tokens, a.trace.tokens)
        np.testing.assert_array_equal(b.trace.prefill_experts, a.trace.prefill_experts)
        np.testing.assert_array_equal(b.trace.decode_experts, a.trace.decode_experts)
        np.testing.assert_array_equal(b.trace.decode_weights, a.trace.decode_weights)
        for (ka, va), (kb, vb) in zip(a.decode_kv + a.prompt_kv, b.decode_kv + b.prompt_kv, strict=True):
            assert torch.equal(kb, ka) and torch.equal(vb, va)


@pytest.mark.parametrize("model", ["micro_mixtral", "micro_qwen2moe"])
@pytest.mark.parametrize(
    "mode, positions, prompt_kv",
    [
        ("token", "since_last", False),
        ("token_kv", "since_last", False),
        ("T1_KV3", "newest", False),
        ("T1_KV3", "since_last", True),
        ("T1_KVoff", "since_last", True),
    ],
)
def test_parallel_replay_is_emulate_for_fp32(model, mode, positions, prompt_kv, request):
    lm = request.getfixturevalue(model)
    shadow = build_shadow(lm.model, lm.adapter, "fp32")
    alignment = Alignment.parse(mode, positions, prompt_kv)
    for record in _records(lm):
        _same(emulate(shadow, record, alignment), replay_parallel(shadow, record, alignment))


def _drifted(lm, precision: str):
    """A shadow whose own tokens differ from the full model's, so own tokens matter."""
    shadow = build_shadow(lm.model, lm.adapter, precision)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        head = shadow.model.lm_head.weight
        head.add_((0.5 * torch.randn(head.shape, generator=g)).to(head.dtype))
    return shadow


@pytest.mark.parametrize("model", ["micro_mixtral", "micro_qwen2moe"])
@pytest.mark.parametrize(
    "precision, mode, positions, prompt_kv",
    [
        ("fp32", "none", "since_last", False),
        ("fp32", "T2_KV3", "newest", False),
        ("fp32", "kv", "since_last", True),
        ("fp32", "T3_KV2", "since_last", False),
        ("fp16", "none", "since_last", False),
        ("int8", "none", "since_last", False),
        ("nf4", "T2_KV3", "since_last", False),
    ],
)
def test_batched_replay_is_emulate_bit_for_bit(model, precision, mode, positions, prompt_kv, request):
    lm = request.getfixturevalue(model)
    shadow = _drifted(lm, precision)
    records = _records(lm)
    alignment = Alignment.parse(mode, positions, prompt_kv)
    ems, path = replay(shadow, records, alignment)
    assert path == "batched"
    refs = [emulate(shadow, r, alignment) for r in records]
    assert any((ref.inputs != r.trace.tokens).any() for ref, r in zip(refs, records, strict=True))
    for ref, fast in zip(refs, ems, strict=True):
        _same(ref, fast, exact=True)


def test_padded_batch_is_emulate_up_to_rounding_for_fp32(micro_mixtral):
    """Prompts of different lengths in one batch attend under a padding mask (``replay`` does not do
    this: it batches by length); for fp32 the routing is still ``emulate``'s."""
    shadow = _drifted(micro_mixtral, "fp32")
    records = _records(micro_mixtral)
    alignment = Alignment.parse("T2_KV3")
    for ref, fast in zip(
        [emulate(shadow, r, alignment) for r in records],
        emulate_batch(shadow, records, alignment),
        strict=True,
    ):
        _same(ref, fast)


def test_replay_picks_the_path_and_can_be_forced_sequential(micro_mixtral):
    shadow = build_shadow(micro_mixtral.model, micro_mixtral.adapter, "fp32")
    records = _records(micro_mixtral, PROMPTS[:2], 6)
    assert replay(shadow, records, Alignment.parse("token_kv"))[1] == "parallel"
    assert replay(shadow, records, Alignment.parse("T2_KV1"))[1] == "batched"
    assert replay(shadow, records, Alignment.parse("token_kv"), "sequential")[1] == "sequential"
    assert "token period" in parallel_blocker(shadow, records[0], Alignment.parse("none"))
    with pytest.raises(OdmoeError, match="parallel SEP replay does not apply to Toff_KV1"):
        replay_parallel(shadow, records[0], Alignment.parse("kv"))
    with pytest.raises(OdmoeError, match="unknown replay 'fast'.*auto.*sequential"):
        replay(shadow, records, Alignment.parse("token"), "fast")
    shorter = record_reference(micro_mixtral.model, micro_mixtral.adapter, "x", (1, 2, 3), 4)
    with pytest.raises(OdmoeError, match="same output length"):
        emulate_batch(shadow, [records[0], shorter], Alignment.parse("none"))


def test_kv_sources_follow_the_schedule():
    since = kv_sources(Alignment.parse("T1_KV3"), 8)  # KV aligned before n = 4, 7
    assert since[3].nonzero()[0].tolist() == [0, 1, 2] and since[6].nonzero()[0].tolist() == list(range(6))
    assert not since[2].any() and (since[5] == since[3]).all()
    newest = kv_sources(Alignment.parse("T1_KV3", "newest"), 8)
    assert newest[6].nonzero()[0].tolist() == [2, 5]  # o_3 before n = 4, o_6 before n = 7
    assert not kv_sources(Alignment.parse("token"), 8).any()


@pytest.mark.parametrize("precision", ["fp16", "int8", "nf4"])
def test_quantized_fast_replays_keep_recall_within_0001(micro_mixtral, precision):
    """4 prompts x 128 tokens: 2,048 routing rows, so one decision that differs moves recall by 1/4,096."""
    lm = micro_mixtral
    prompts = [
        (f"q{i}", tuple(int(t) for t in np.random.default_rng(i).integers(5, 500, 8))) for i in range(4)
    ]
    records = _records(lm, prompts, 128)
    shadow = build_shadow(lm.model, lm.adapter, precision)
    k = lm.adapter.top_k
    for mode in ("none", "token", "token_kv"):
        alignment = Alignment.parse(mode)
        ref = [emulate(shadow, r, alignment) for r in records]
        fast, _ = replay(shadow, records, alignment)
        true = [r.trace.decode_experts for r in records]
        recall = [
            sum(int(hits(e.experts, t).sum()) for e, t in zip(ems, true, strict=True))
            / (k * sum(t[..., 0].size for t in true))
            for ems in (ref, fast)
        ]
        rows = sum(
            int((np.sort(a.experts, -1) != np.sort(b.experts, -1)).any(-1).sum())
            for a, b in zip(ref, fast, strict=True)
        )
        print(
            f"{precision} {mode}: recall {recall[0]:.5f} sequential, {recall[1]:.5f} fast; {rows} routing rows differ"
        )
        assert abs(recall[0] - recall[1]) <= 0.001
        if mode == "none":  # batched: bit for bit
            assert rows == 0 and all(
                (a.own_tokens == b.own_tokens).all() for a, b in zip(ref, fast, strict=True)
            )


def test_evaluate_fast_and_sequential_fill_the_same_tables(tmp_path, micro_mixtral):
    from odmoe.data.prompts import Prompt
    from odmoe.predict.evaluate import evaluate, load_tables
    from odmoe.results import Run

    prompts = [Prompt(pid, p) for pid, p in PROMPTS]
    modes = ["none", "token_kv", "T2_KV2"]
    tables = {}
    for replay_path, workers in (("auto", 2), ("sequential", 1)):  # auto: the forked-worker path
        run = Run(tmp_path / replay_path, "recall", {"replay": replay_path})
        timing = evaluate(
            run, micro_mixtral, prompts, 12, ["fp32"], modes, workers=workers, replay=replay_path
        )
        assert timing["replay"] == replay_path
        tables[replay_path] = load_tables(run)
    runs = tables["auto"]["recall_runs"].set_index(["alignment", "prompt_id"]).sort_index()
    assert (
        runs["replay"].xs("token_kv").eq("parallel").all() and runs["replay"].xs("none").eq("batched").all()
    )
    assert runs["batch"].xs("none").eq(3).all()
    assert tables["sequential"]["recall_runs"]["replay"].eq("sequential").all()
    key = ["precision", "alignment", "prompt_id", "n"]
    fast, seq = (t["recall_tokens"].sort_values(key).reset_index(drop=True) for t in tables.values())
    pd.testing.assert_frame_equal(
        fast[[*key, "hits", "same_input", "kv_aligned"]], seq[[*key, "hits", "same_input", "kv_aligned"]]
    )
    refs = tables["auto"]["references"]
    assert len(refs) == 3 and set(refs["batch"]) == {1, 2}  # two workers' shares: 2 + 1 prompts
    with pytest.raises(OdmoeError, match="unknown replay 'fast'"):
        evaluate(run, micro_mixtral, prompts, 12, ["fp32"], modes, replay="fast")


def test_parallel_replay_uses_only_what_iteration_n_knows(micro_mixtral):
    """The mixed attention must not let iteration n see o_{n+1}.. or the full model's KV of o_n.."""
    from dataclasses import replace

    from odmoe.predict.sep import ReferenceRecord

    lm = micro_mixtral
    (record,) = _records(lm, PROMPTS[:1], 16)
    shadow = build_shadow(lm.model, lm.adapter, "fp16")
    n = 6
    gen = torch.Generator().manual_seed(0)
    tokens = record.trace.tokens.copy()
    tokens[n:] = np.random.default_rng(0).integers(0, lm.model.config.vocab_size, size=len(tokens) - n)
    kv = [
        tuple(torch.cat([t[: n - 1], torch.randn(t[n - 1 :].shape, generator=gen)]) for t in pair)
        for pair in record.decode_kv
    ]
    scrambled = ReferenceRecord(replace(record.trace, tokens=tokens), record.prompt_kv, kv)
    for mode in ("token_kv", "T1_KV2"):
        base = replay_parallel(shadow, record, Alignment.parse(mode)).experts
        other = replay_parallel(shadow, scrambled, Alignment.parse(mode)).experts
        np.testing.assert_array_equal(other[:n], base[:n])
        assert (other[n:] != base[n:]).any()


def test_batched_captures_equal_one_prompt_at_a_time(micro_mixtral):
    from odmoe.predict.harness import capture_reference, capture_references

    lm = micro_mixtral
    batch = capture_references(lm.model, lm.adapter, PROMPTS, 10)
    for (pid, prompt), (capture, _) in zip(PROMPTS, batch, strict=True):
        one, _ = capture_reference(lm.model, lm.adapter, pid, prompt, 10)
        np.testing.assert_array_equal(capture.trace.decode_experts, one.trace.decode_experts)
        np.testing.assert_array_equal(capture.prompt_embedding, one.prompt_embedding)
        for tap in ("x", "h", "u", "p"):
            assert (
                capture.prefill[tap].shape
                == one.prefill[tap].shape
                == (len(prompt), 4, one.prefill[tap].shape[-1])
            )
            np.testing.assert_array_equal(capture.prefill[tap], one.prefill[tap])
            np.testing.assert_array_equal(capture.decode[tap], one.decode[tap])
