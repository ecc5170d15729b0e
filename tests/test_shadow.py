"""The SEP shadow: real quantized experts, byte bounds, exactness, and both alignment paths."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import numpy as np
import pytest
import torch

from odmoe.errors import OdmoeError
from odmoe.metrics import hits, recall_overall
from odmoe.models.adapter import eager_experts_forward
from odmoe.predict import Alignment, build_shadow, emulate, record_reference, weight_bytes
from odmoe.predict.quantize import require_bitsandbytes

PROMPT = (7, 42, 99, 3, 250, 11, 64, 301)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def record(micro_mixtral):
    return record_reference(micro_mixtral.model, micro_mixtral.adapter, "p0", PROMPT, 24)


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_routed_experts_are_stored_and_run_quantized(micro_mixtral, precision):
    lm = micro_mixtral
    a = lm.adapter
    shadow = build_shadow(lm.model, a, precision)
    e, h, f = a.num_experts, a.hidden_size, a.expert_intermediate_size
    for layer in a.moe_layers:
        experts = shadow.adapter.experts(layer)
        assert "gate_up_proj" not in dict(experts.named_parameters())  # no full-precision copy left
        q = experts.odmoe_quantized
        if precision == "int8":
            assert q.gate_up_data.dtype == torch.int8 and q.gate_up_data.shape == (e, 2 * f, h)
            assert q.down_data.dtype == torch.int8 and q.gate_up_scale.shape == (e, 2 * f)
        else:
            assert q.gate_up_data.dtype == torch.uint8 and q.gate_up_data.numel() == e * 2 * f * h // 2
            assert q.gate_up_scale.shape == (e, 2 * f * h // 64)
        attention = shadow.model.model.layers[layer].self_attn
        assert isinstance(attention.q_proj, bnb.nn.Linear8bitLt if precision == "int8" else bnb.nn.Linear4bit)

    # the quantized experts approximate the fp32 ones, and not by secretly running fp16 weights
    torch.manual_seed(0)
    x = torch.randn(5, h)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [1, 6]])
    w = torch.full((5, 2), 0.5)
    layer = a.moe_layers[0]
    ref = eager_experts_forward(a.experts(layer), x, idx, w)
    half = eager_experts_forward(copy.deepcopy(a.experts(layer)).half(), x.half(), idx, w).float()
    out = shadow.adapter.experts(layer).odmoe_quantized(None, x.half(), idx, w).float()
    err = (out - ref).norm() / ref.norm()
    assert 1e-4 < err < (0.05 if precision == "int8" else 0.2)
    assert (out - half).norm() / ref.norm() > 1e-4


@pytest.mark.parametrize("precision", ["int8", "nf4"])
@pytest.mark.parametrize("rows", [1, 5])
def test_quantized_experts_equal_bitsandbytes_matmuls_bit_for_bit(micro_mixtral, precision, rows):
    """``QuantizedExperts`` calls bitsandbytes' ops without ``bnb.matmul``'s wrapper (and keeps CPU nf4
    weights dequantized): the numbers must be the wrapper's own, outliers included."""
    from bitsandbytes.functional import QuantState

    from odmoe.predict.quantize import NF4_BLOCKSIZE, _int8_state

    q = (
        build_shadow(micro_mixtral.model, micro_mixtral.adapter, precision)
        .adapter.experts(micro_mixtral.adapter.moe_layers[0])
        .odmoe_quantized
    )
    torch.manual_seed(1)
    x = torch.randn(rows, q.shapes["gate_up"][1]).half()
    x[0, 3] = 9.0  # above LLM.int8()'s outlier threshold: the mixed-precision decomposition runs
    for expert in range(q.num_experts):
        data, scale = q.gate_up_data[expert], q.gate_up_scale[expert]
        if precision == "int8":
            want = bnb.matmul(x, data, state=_int8_state(data, scale, q.int8_threshold))
        else:
            state = QuantState(
                absmax=scale,
                shape=torch.Size(q.shapes["gate_up"]),
                code=q.nf4_code,
                blocksize=NF4_BLOCKSIZE,
                quant_type="nf4",
                dtype=torch.float16,
            )
            want = bnb.matmul_4bit(x, data.t(), quant_state=state)
        for _ in range(2):  # the second call uses the kept nf4 weight
            assert torch.equal(q._linear(x, "gate_up", expert), want)


def test_int8_outlier_columns_stay_per_row_in_a_row_exact_forward(micro_mixtral):
    """LLM.int8() picks fp16 outlier columns over all rows of a call; in a row-exact forward each row
    gets its own, so a row's numbers are its batch-1 numbers (and outside one they are not)."""
    from odmoe.models.rowexact import row_exact

    shadow = build_shadow(micro_mixtral.model, micro_mixtral.adapter, "int8")
    q = shadow.adapter.experts(micro_mixtral.adapter.moe_layers[0]).odmoe_quantized
    torch.manual_seed(3)
    x = torch.randn(4, q.shapes["gate_up"][1]).half()
    x[0, 3] = 9.0  # an outlier in row 0 only
    alone = torch.cat([q._linear(x[i : i + 1], "gate_up", 0) for i in range(4)])
    assert not torch.equal(q._linear(x, "gate_up", 0)[1:], alone[1:])  # rows 1-3 lose column 3's int8
    with row_exact(shadow.model, shadow.adapter):
        assert torch.equal(q._linear(x, "gate_up", 0), alone)


@pytest.mark.parametrize("in_features", [96, 128])  # 128: bitsandbytes' one-row GEMV branch
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5])
def test_nf4_linear_keeps_bitsandbytes_numbers_bit_for_bit(in_features, bias, rows):
    """The shadow's nf4 linear keeps its CPU weight dequantized: the numbers must be bitsandbytes' own."""
    from odmoe.predict.quantize import quantize_linear

    torch.manual_seed(2)
    q = quantize_linear(torch.nn.Linear(in_features, 48, bias=bias), "nf4")
    x = torch.randn(rows, 1, in_features).half()
    want = bnb.nn.Linear4bit.forward(q, x)
    for _ in range(2):  # the second call uses the kept weight
        assert torch.equal(q(x), want)


@pytest.mark.parametrize("precision, low, high", [("int8", 0.25, 0.30), ("nf4", 0.125, 0.145)])
def test_shadow_bytes_within_bounds(micro_mixtral, precision, low, high):
    a = micro_mixtral.adapter
    full = weight_bytes(micro_mixtral.model)
    mine = build_shadow(micro_mixtral.model, a, precision).weight_bytes()
    # routed experts: exactly the format's bytes (data + fp32 scales), within the stated bounds
    assert mine["routed_experts"] == a.num_moe_layers * a.num_experts * a.expert_bytes(precision)
    assert low * full["routed_experts"] < mine["routed_experts"] < high * full["routed_experts"]
    assert low * full["layer_linears"] < mine["layer_linears"] < 1.5 * high * full["layer_linears"]
    for part in ("embeddings", "lm_head", "routers", "norms"):  # kept in fp16
        assert mine[part] == full[part] // 2
    assert mine["total"] == sum(v for k, v in mine.items() if k != "total")


def test_fp32_shadow_with_alignment_has_recall_exactly_one(micro_mixtral, record):
    shadow = build_shadow(micro_mixtral.model, micro_mixtral.adapter, "fp32")
    em = emulate(shadow, record, Alignment.parse("token_kv"))
    assert recall_overall(hits(em.experts, record.trace.decode_experts)[None], k=2) == 1.0
    assert (em.inputs == record.trace.tokens).all()


def _perturbed_fp32_shadow(lm, lm_head_noise: float = 0.0, value_noise: float = 0.0):
    """A real fp32 shadow whose weights were changed, so its own choices differ from the model's."""
    shadow = build_shadow(lm.model, lm.adapter, "fp32")
    torch.manual_seed(1)
    with torch.no_grad():
        if lm_head_noise:
            shadow.model.lm_head.weight.add_(lm_head_noise * torch.randn_like(shadow.model.lm_head.weight))
        for layer in shadow.model.model.layers:
            v = layer.self_attn.v_proj.weight
            v.add_(value_noise * v.std() * torch.randn_like(v))
    return shadow


def test_token_alignment_feeds_the_full_models_tokens(micro_mixtral, record):
    shadow = _perturbed_fp32_shadow(micro_mixtral, lm_head_noise=1.0)
    ref = record.trace.tokens
    free = emulate(shadow, record, Alignment.parse("none"))
    assert (free.inputs[1:] == free.own_tokens[:-1]).all()  # unaligned: its own argmax
    assert (free.inputs != ref).any()  # ... which differs from the full model's tokens
    every = emulate(shadow, record, Alignment.parse("token"))
    assert (every.inputs == ref).all()
    second = emulate(shadow, record, Alignment.parse("T2_KVoff"))
    aligned = second.token_aligned
    assert aligned.tolist() == [n % 2 == 1 for n in range(1, len(ref) + 1)]
    assert (second.inputs[aligned] == ref[aligned]).all()
    assert (second.inputs[1:][~aligned[1:]] == second.own_tokens[:-1][~aligned[1:]]).all()
    true = record.trace.decode_experts
    assert recall_overall(hits(every.experts, true)[None], 2) > recall_overall(
        hits(free.experts, true)[None], 2
    )


def _decode_keys(em, prompt_len: int, layer: int = 0) -> torch.Tensor:
    keys = em.cache.layers[layer].keys[0]  # [heads, P + O, dim]
    return keys[:, prompt_len:].transpose(0, 1).float()  # [O, heads, dim] rows for o_1..o_O


def test_kv_alignment_overwrites_the_shadows_cache(micro_mixtral, record):
    shadow = build_shadow(micro_mixtral.model, micro_mixtral.adapter, "nf4")
    ref_keys = record.decode_kv[0][0].to(torch.float16).float()  # [O, heads, dim]
    o, p = record.output_len, len(PROMPT)
    token_only = emulate(shadow, record, Alignment.parse("token"))
    own = _decode_keys(token_only, p)
    assert not torch.equal(own[: o - 1], ref_keys[: o - 1])  # the nf4 shadow's own KV differs

    every = emulate(shadow, record, Alignment.parse("token_kv"))
    got = _decode_keys(every, p)
    assert torch.equal(got[: o - 1], ref_keys[: o - 1])  # o_1..o_{O-1} are the full model's, cast
    assert every.cache.layers[0].keys.dtype == torch.float16
    # (whether the aligned KV changes this shadow's routing depends on the trained micro model; a
    # shadow drifted on purpose shows it: test_kv_alignment_changes_routing_of_a_drifted_shadow)

    newest = emulate(shadow, record, Alignment.parse("T1_KV4", kv_positions="newest"))
    got = _decode_keys(newest, p)
    sent = [m for m in range(1, o) if (m % 4) == 0]  # before n = 5, 9, ...: o_4, o_8, ...
    kept = [m for m in range(1, o) if m not in sent]
    assert newest.kv_aligned.nonzero()[0].tolist() == [m for m in range(o) if m % 4 == 0 and m > 0]
    assert all(torch.equal(got[m - 1], ref_keys[m - 1]) for m in sent)
    assert not any(torch.equal(got[m - 1], ref_keys[m - 1]) for m in kept)

    since = emulate(shadow, record, Alignment.parse("T1_KV4", kv_positions="since_last"))
    last_sent = max(sent)
    assert torch.equal(_decode_keys(since, p)[:last_sent], ref_keys[:last_sent])


def test_kv_alignment_changes_routing_of_a_drifted_shadow(micro_mixtral, record):
    shadow = _perturbed_fp32_shadow(micro_mixtral, value_noise=1.0)
    true = record.trace.decode_experts
    token = emulate(shadow, record, Alignment.parse("token"))
    both = emulate(shadow, record, Alignment.parse("token_kv"))
    assert not np.array_equal(token.experts, both.experts)
    assert recall_overall(hits(both.experts, true)[None], 2) > recall_overall(
        hits(token.experts, true)[None], 2
    )


def test_qwen2moe_int8_shadow_quantizes_shared_expert_and_runs(micro_qwen2moe):
    lm = micro_qwen2moe
    shadow = build_shadow(lm.model, lm.adapter, "int8")
    mlp = shadow.model.model.layers[0].mlp
    assert isinstance(mlp.shared_expert.up_proj, bnb.nn.Linear8bitLt)
    rec = record_reference(lm.model, lm.adapter, "q", PROMPT, 6)
    em = emulate(shadow, rec, Alignment.parse("token_kv"))
    assert em.experts.shape == rec.trace.decode_experts.shape
    assert recall_overall(hits(em.experts, rec.trace.decode_experts)[None], lm.adapter.top_k) > 0.8


def test_bad_input_is_a_clear_error(micro_mixtral):
    with pytest.raises(OdmoeError, match="unknown shadow precision 'int4'.*fp16, int8, nf4"):
        build_shadow(micro_mixtral.model, micro_mixtral.adapter, "int4")
    for bad in (0, -2, 1.5, "x"):
        with pytest.raises(OdmoeError, match="period .* is invalid.*>= 1"):
            Alignment(token_period=bad)
    with pytest.raises(OdmoeError, match="KV alignment period '0' is invalid"):
        Alignment.parse("T1_KV0")
    with pytest.raises(OdmoeError, match="unknown alignment mode"):
        Alignment.parse("sometimes")
    with pytest.raises(OdmoeError, match="kv_positions"):
        Alignment(kv_positions="all")
    # a device bitsandbytes cannot compute on: the error names precision, device and the fixes
    with pytest.raises(OdmoeError, match=r"nf4 needs bitsandbytes nf4 kernels on meta.*fp16"):
        require_bitsandbytes("nf4", "meta")
