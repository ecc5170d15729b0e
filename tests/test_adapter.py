"""The adapter over every supported family: structure, expert views, bytes, the expert hook, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from odmoe.errors import OdmoeError
from odmoe.models import load_model
from odmoe.models.adapter import MoEAdapter, eager_experts_forward, swiglu_expert

ATTN = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=3, vocab_size=128)
FAMILIES = {
    "mixtral": (dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2), 0, (0, 1, 2)),
    "qwen2_moe": (
        dict(
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=48,
            num_experts=6,
            num_experts_per_tok=3,
        ),
        1,
        (0, 1, 2),
    ),
    "qwen3_moe": (
        dict(
            intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2, head_dim=16
        ),
        0,
        (0, 1, 2),
    ),
    "olmoe": (dict(intermediate_size=24, num_experts=8, num_experts_per_tok=4), 0, (0, 1, 2)),
    "deepseek_v2": (
        dict(
            intermediate_size=48,
            moe_intermediate_size=24,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
        ),
        2,
        (1, 2),
    ),
    "deepseek_v3": (
        dict(
            intermediate_size=48,
            moe_intermediate_size=24,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_group=2,
            topk_group=1,
        ),
        1,
        (1, 2),
    ),
}


def _save_random(tmp_path, model_type: str, tokenizer, **kwargs):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **ATTN, **kwargs)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # some families initialise routers/experts to zeros
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loads_and_hook_controls_experts(family, tmp_path, micro_mixtral):
    kwargs, shared, moe_layers = FAMILIES[family]
    path = _save_random(tmp_path, family, micro_mixtral.tokenizer, **kwargs)
    lm = load_model("local", path=str(path))
    a = lm.adapter
    assert a.model_type == family
    assert tuple(a.moe_layers) == moe_layers
    assert a.num_shared_experts == shared
    assert a.top_k == kwargs["num_experts_per_tok"]
    assert a.num_experts == kwargs.get(
        "num_local_experts", kwargs.get("num_experts", kwargs.get("n_routed_experts"))
    )
    h, f = a.hidden_size, a.expert_intermediate_size
    assert a.expert_bytes("fp32") == 3 * h * f * 4
    assert a.expert_bytes("fp16") == 3 * h * f * 2
    assert (
        a.expert_bytes("fp32") / 8 < a.expert_bytes("nf4") < a.expert_bytes("int8") < a.expert_bytes("fp16")
    )

    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        reference = lm.model(input_ids=ids).logits
        calls = []

        def counting(module, hidden, idx, w):
            calls.append(idx.shape)
            return eager_experts_forward(module, hidden, idx, w)

        for layer in a.moe_layers:
            a.set_experts_forward(layer, counting)
        same = lm.model(input_ids=ids).logits
        assert len(calls) == len(a.moe_layers) and calls[0] == (8, a.top_k)
        torch.testing.assert_close(same, reference, rtol=0, atol=0)

        a.set_experts_forward(a.moe_layers[-1], lambda m, hid, idx, w: torch.zeros_like(hid))
        changed = lm.model(input_ids=ids).logits
        assert not torch.allclose(changed, reference)
        a.clear_experts_forward()
        torch.testing.assert_close(lm.model(input_ids=ids).logits, reference, rtol=0, atol=0)


def test_expert_views_compute_the_expert(micro_mixtral):
    a = micro_mixtral.adapter
    layer = a.moe_layers[1]
    experts = a.experts(layer)
    x = torch.randn(5, a.hidden_size)
    idx = torch.full((5, 1), 3)
    w = torch.ones(5, 1)
    with torch.no_grad():
        expected = eager_experts_forward(experts, x, idx, w)
        ew = a.expert_weights(layer, 3)
        got = swiglu_expert(x, ew.gate_up, ew.down, experts.act_fn)
    torch.testing.assert_close(got, expected)
    assert ew.numel == a.expert_params
    assert ew.gate_up.data_ptr() == experts.gate_up_proj[3].data_ptr()  # a view, not a copy


def test_non_moe_model_is_refused(tmp_path, micro_mixtral):
    config = AutoConfig.for_model("llama", **ATTN, intermediate_size=48)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(OdmoeError, match="not a supported MoE"):
        load_model("local", path=str(tmp_path))
    with pytest.raises(OdmoeError, match="not a supported MoE"):
        MoEAdapter(AutoModelForCausalLM.from_config(config))


def test_missing_and_pickled_checkpoints_are_refused(tmp_path, micro_mixtral):
    with pytest.raises(OdmoeError, match="does not exist"):
        load_model("local", path=str(tmp_path / "nope"))
    with pytest.raises(OdmoeError, match="not in the local Hugging Face cache"):
        load_model("local", path="no-such-org/no-such-model")
    micro_mixtral.model.config.save_pretrained(tmp_path)
    torch.save(micro_mixtral.model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OdmoeError, match="safetensors"):
        load_model("local", path=str(tmp_path))
