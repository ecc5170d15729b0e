"""Shared fixtures: a private ODMOE_HOME and the micro embedded models (trained once per session).

Set ODMOE_TEST_HOME to a directory to keep the trained micro models between pytest runs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from odmoe.models import LoadedModel, load_model
from odmoe.models.tiny import ensure_embedded

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where a CUDA device is visible and are skipped, saying why, elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); run on a GPU machine (docs/runtime.md)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def odmoe_home(tmp_path_factory) -> Path:
    home = Path(os.environ.get("ODMOE_TEST_HOME") or tmp_path_factory.mktemp("odmoe_home"))
    os.environ["ODMOE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def micro_mixtral_dir(odmoe_home) -> Path:
    return ensure_embedded("micro-mixtral")


@pytest.fixture(scope="session")
def micro_qwen2moe_dir(odmoe_home) -> Path:
    return ensure_embedded("micro-qwen2moe")


@pytest.fixture
def micro_mixtral(micro_mixtral_dir) -> LoadedModel:
    """A fresh copy of the trained micro Mixtral (tests may install hooks or modify it)."""
    return load_model("micro-mixtral", device="cpu")


@pytest.fixture
def micro_qwen2moe(micro_qwen2moe_dir) -> LoadedModel:
    return load_model("micro-qwen2moe", device="cpu")


@pytest.fixture
def one_thread():
    """Micro models are all per-op overhead: one thread avoids contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Every supported family at micro size, random-init (layer counts give the MoE layers a two-worker cluster
# can serve; DeepSeek's first layer is dense, as in the real models). Experts and routers are drawn with a
# wide spread (``_FAMILY_INIT``) so routing and next-token choices are decided by clear margins, not ties.
_FAMILY_ATTN = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=3)
_MLA = dict(
    intermediate_size=48,
    moe_intermediate_size=24,
    n_routed_experts=8,
    num_experts_per_tok=2,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=8,
    first_k_dense_replace=1,
)
FAMILY_CONFIGS = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=48,
        num_experts=6,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2, head_dim=16
    ),
    "olmoe": dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2),
    # MLA without a query LoRA, K (24) and V (8) head sizes differ, two shared experts
    "deepseek_v2": dict(
        **_MLA, n_shared_experts=2, q_lora_rank=None, n_group=1, topk_group=1, topk_method="greedy"
    ),
    # MLA with a query LoRA, sigmoid routing with group-limited choice and a correction bias
    "deepseek_v3": dict(**_MLA, n_shared_experts=1, q_lora_rank=16, n_group=2, topk_group=1),
}
_FAMILY_INIT = 0.3


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory, micro_mixtral_dir):
    """``family_dir(model_type)``: a saved random-init micro model of that family (the micro tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            path = tmp_path_factory.mktemp(f"family-{family}")
            tokenizer = AutoTokenizer.from_pretrained(micro_mixtral_dir)
            torch.manual_seed(0)
            config = AutoConfig.for_model(
                family,
                **_FAMILY_ATTN,
                **FAMILY_CONFIGS[family],
                vocab_size=len(tokenizer),
                max_position_embeddings=256,
                tie_word_embeddings=False,
                **dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"), tokenizer.eos_token_id),
            )
            model = AutoModelForCausalLM.from_config(config)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.dim() > 1 and ("experts" in name or name.endswith("gate.weight")):
                        p.normal_(0, _FAMILY_INIT)
                    elif p.dim() > 1 and p.abs().sum() == 0:
                        p.normal_(0, 0.05)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[family] = path
        return made[family]

    return make


@pytest.fixture
def run_side_by_side():
    """Run commands at once (the suite has 2 cores; each command is mostly one busy import-bound thread):
    their ``CompletedProcess``es, in order."""

    def run(cmds: list[list[str]], **popen) -> list[subprocess.CompletedProcess]:
        procs = [
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
            for cmd in cmds
        ]
        outputs = [p.communicate(timeout=600) for p in procs]  # reads the pipes, then waits
        return [
            subprocess.CompletedProcess(p.args, p.returncode, *out)
            for p, out in zip(procs, outputs, strict=True)
        ]

    return run
