"""Prompt sets in the paper's workload shapes.

* ``embedded``: windows of the held-out *evaluation* chapters of the embedded corpus (or the
  *calibration* chapters with ``split=calib``), so no prompt was trained on and calibration and
  evaluation prompts never overlap. Window ``j`` of chapter ``c`` starts at token ``256 * j``;
  prompts are taken first window of every chapter, then second, and so on.
* ``alpaca`` (HOBBIT's speed workload) and ``longwriter`` (the recall workload): loaded with
  ``datasets`` from the local cache only (or ``data.path``, a local json/jsonl/parquet file);
  instructions with at least ``prompt_len`` tokens are cut to exactly ``prompt_len``.
"""

from __future__ import annotations

from dataclasses import dataclass

from odmoe.data.corpus import split_chapters
from odmoe.errors import OdmoeError

WINDOW_STRIDE = 256
HF_DATASETS = {
    "alpaca": ("tatsu-lab/alpaca", "instruction"),
    "longwriter": ("THUDM/LongWriter-6k", "messages"),
}


@dataclass(frozen=True)
class Prompt:
    id: str
    token_ids: tuple[int, ...]


def embedded_prompts(tokenizer, num: int, prompt_len: int, split: str = "eval") -> list[Prompt]:
    docs = [tokenizer(text)["input_ids"] for text in split_chapters(split)]
    out: list[Prompt] = []
    j = 0
    while len(out) < num:
        fitting = [(c, ids) for c, ids in enumerate(docs) if WINDOW_STRIDE * j + prompt_len <= len(ids)]
        if not fitting:
            raise OdmoeError(
                f"the embedded {split} split holds only {len(out)} prompts of {prompt_len} tokens; "
                "ask for fewer (data.num_prompts) or shorter prompts"
            )
        for c, ids in fitting:
            start = WINDOW_STRIDE * j
            out.append(Prompt(f"{split}-c{c}-w{j}", tuple(ids[start : start + prompt_len])))
            if len(out) == num:
                break
        j += 1
    return out


def _dataset_texts(source: str, path: str | None) -> list[str]:
    import datasets

    name, field = HF_DATASETS[source]
    try:
        if path:
            kind = "parquet" if str(path).endswith(".parquet") else "json"
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            datasets.config.HF_HUB_OFFLINE = True
            ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # datasets raises many types for "not cached"
        raise OdmoeError(
            f"{source} prompts ({name}) are not available offline ({type(e).__name__}); on a machine with network run "
            f"`python -c \"import datasets; datasets.load_dataset('{name}')\"` and copy ~/.cache/huggingface here, "
            "or pass data.path=/local/file.jsonl"
        ) from None
    texts = []
    for row in ds:
        value = row[field]
        if isinstance(value, list):  # chat format: the first user turn
            value = next((m["content"] for m in value if m.get("role") == "user"), "")
        texts.append(value)
    return texts


def load_prompts(data_cfg, tokenizer, prompt_len: int, num: int) -> list[Prompt]:
    """Prompts of exactly ``prompt_len`` tokens from the configured source."""
    if num <= 0 or prompt_len <= 0:
        raise OdmoeError(f"need a positive number of prompts and prompt length, got {num} x {prompt_len}")
    source = data_cfg.source
    if source == "embedded":
        return embedded_prompts(tokenizer, num, prompt_len, data_cfg.get("split", "eval"))
    if source not in HF_DATASETS:
        raise OdmoeError(f"unknown prompt source {source!r}; use embedded, {', '.join(HF_DATASETS)}")
    out = []
    for i, text in enumerate(_dataset_texts(source, data_cfg.get("path"))):
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= prompt_len:
            out.append(Prompt(f"{source}-{i}", tuple(ids[:prompt_len])))
            if len(out) == num:
                return out
    raise OdmoeError(f"{source} has only {len(out)} prompts of at least {prompt_len} tokens; ask for fewer")
