"""Calibration routing shared by the policies that fit something (AdapMoE's threshold and cache sizes,
MoE-Infinity's warm EAM store): fp32 reference decodes of prompts from the corpus's *calibration*
split, never the evaluation prompts. Cached on the loaded model so several systems share one pass."""

from __future__ import annotations

from odmoe.data.prompts import embedded_prompts
from odmoe.models.load import LoadedModel
from odmoe.trace import Trace, reference_decode


def calibration_traces(
    lm: LoadedModel, num: int = 2, prompt_len: int = 32, output_len: int = 48
) -> list[Trace]:
    """Reference routing of ``num`` calibration prompts (computed once per loaded model)."""
    key = (num, prompt_len, output_len)
    cache = lm.__dict__.setdefault("_baselines_calib", {})
    if key not in cache:
        prompts = embedded_prompts(lm.tokenizer, num, prompt_len, split="calib")
        cache[key] = [reference_decode(lm.model, lm.adapter, p.id, p.token_ids, output_len) for p in prompts]
    return cache[key]
