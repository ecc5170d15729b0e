"""The decoding rule: greedy, with the model's no-repeat-n-gram and repetition-penalty constraints.

Every place that picks a token (the reference, the SEP shadow, the runtime's main and shadow nodes,
the cached model, the offloading engine) calls ``next_token``, so all of them make the same choice
from the same logits and history, and OD-MoE's output can equal the cached model's.

The constraints are transformers' own logits processors, read from the model's ``generation_config``
(``no_repeat_ngram_size``, ``repetition_penalty``), which ``load_model`` sets from ``model.decode`` in
the Hydra config; a checkpoint's own values are overridden, so plain greedy unless configured.

Why (a choice the paper does not face): the embedded 8 M-parameter model decoded plainly greedily
falls into "and the LORD, and the LORD, ..." within a few tokens on every prompt. A 4-token cycle
has large argmax margins, so a quantized shadow either leaves it at once or never, and recall over
it measures nothing. The embedded models therefore decode with ``no_repeat_ngram_size: 3`` and
produce varied text; real checkpoints decode plainly greedily.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from odmoe.errors import OdmoeError


def set_decode_rule(model, decode: Mapping | None) -> None:
    """Store the decoding constraints of ``decode`` (``model.decode`` in the config) on ``model``."""
    decode = dict(decode or {})
    unknown = set(decode) - {"no_repeat_ngram_size", "repetition_penalty"}
    if unknown:
        raise OdmoeError(
            f"unknown model.decode keys {sorted(unknown)}; use no_repeat_ngram_size and repetition_penalty"
        )
    ngram = int(decode.get("no_repeat_ngram_size") or 0)
    penalty = float(decode.get("repetition_penalty") or 1.0)
    if ngram < 0 or penalty <= 0:
        raise OdmoeError(
            f"model.decode needs no_repeat_ngram_size >= 0 and repetition_penalty > 0, got {ngram} and {penalty}"
        )
    model.generation_config.no_repeat_ngram_size = ngram
    model.generation_config.repetition_penalty = penalty


def _processors(model) -> LogitsProcessorList:
    config = getattr(model, "generation_config", None)
    ngram = int(getattr(config, "no_repeat_ngram_size", 0) or 0)
    penalty = float(getattr(config, "repetition_penalty", 1.0) or 1.0)
    out = LogitsProcessorList()
    if penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(penalty))
    if ngram > 0:
        out.append(NoRepeatNGramLogitsProcessor(ngram))
    return out


def next_token(model, history: Sequence[int], logits: torch.Tensor) -> int:
    """The token that follows ``history`` (prompt and every token fed since), given its ``logits`` [V]."""
    processors = _processors(model)
    if not processors:
        return int(logits.argmax())
    ids = torch.as_tensor(list(history), device=logits.device)[None]
    return int(processors(ids, logits.float()[None]).argmax())
