"""``kjv_next_verse``: multiple-choice next-verse prediction on held-out chapters of the embedded corpus.

The embedded models never saw these chapters (``odmoe.data.corpus``: the *evaluation* split), so the task
measures what they learned, not what they memorized. Each document is one verse position of one
evaluation chapter:

* context: the (up to) ``CONTEXT_VERSES`` verses before it, joined by spaces, as the corpus joins them;
* choices: the first ``CHOICE_WORDS`` words of the true next verse and of the verses at the same relative
  position in three other evaluation chapters (``DISTRACTOR_OFFSETS`` chapters on, cyclically), so every
  distractor is held-out KJV text of the same style and roughly the same length;
* the answer's slot rotates with the document index, so the labels are balanced.

``POSITIONS`` verse positions per chapter (a third and two thirds of the way in) give 60 documents from
the 30 evaluation chapters. Choices are cut to a few words because every system scores a choice one token
per decode step (``odmoe.eval``), and the short choices keep the whole task a few minutes per system on a CPU.
"""

from __future__ import annotations

from typing import Any

from odmoe.data.corpus import chapter_verses, split_of

CONTEXT_VERSES = 3
CHOICE_WORDS = 8
POSITIONS = (1 / 3, 2 / 3)
DISTRACTOR_OFFSETS = (8, 16, 24)


def _head(verse: str) -> str:
    return " ".join(verse.split()[:CHOICE_WORDS])


def documents() -> list[dict[str, Any]]:
    """The task's documents: ``{"id", "context", "choices", "label"}``, in a fixed order."""
    chapters = [(i, v) for i, v in enumerate(chapter_verses()) if split_of(i) == "eval"]
    docs = []
    for c, (index, verses) in enumerate(chapters):
        for frac in POSITIONS:
            pos = max(1, round(frac * len(verses)))
            others = [chapters[(c + off) % len(chapters)][1] for off in DISTRACTOR_OFFSETS]
            distractors = [_head(v[min(len(v) - 1, round(frac * len(v)))]) for v in others]
            label = len(docs) % (len(distractors) + 1)
            choices = distractors[:label] + [_head(verses[pos])] + distractors[label:]
            context = " ".join(verses[max(0, pos - CONTEXT_VERSES) : pos])
            docs.append({"id": f"c{index}-v{pos}", "context": context, "choices": choices, "label": label})
    return docs


def dataset(**_: Any):
    """``custom_dataset`` of the task YAML: a ``datasets.DatasetDict`` with one ``test`` split."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(documents())})
