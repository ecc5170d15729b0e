"""Multiple-choice tasks on held-out chapters of the embedded corpus, for the embedded models.

The embedded models never saw these chapters (``odmoe.data.corpus``: the *evaluation* split), so the tasks
measure what they learned, not what they memorized. Both use ``POSITIONS`` verse positions of each of the 30
evaluation chapters (a third and two thirds of the way in): 60 documents, four choices, the answer's slot
rotating with the document index so the labels are balanced (chance: 25%).

* ``kjv_next_verse``: context = the (up to) ``CONTEXT_VERSES`` verses before the position; choices = the
  first ``CHOICE_WORDS`` words of the true next verse and of the verses at the same relative position in
  three other evaluation chapters (``DISTRACTOR_OFFSETS`` chapters on, cyclically). Hard: the choice's own
  likelihood dominates for a small model.
* ``kjv_next_word``: a cloze; context = the previous verse and the first half of the verse's words; choices
  = the true next word and the next words of three other documents (``WORD_STRIDE`` documents on,
  cyclically, skipping repeats).

Choices are short because every system scores a choice one token per decode step (``odmoe.eval``), which
keeps each task a few minutes per system on a CPU.
"""

from __future__ import annotations

from typing import Any

from odmoe.data.corpus import chapter_verses, split_of

CONTEXT_VERSES = 3
CHOICE_WORDS = 8
POSITIONS = (1 / 3, 2 / 3)
DISTRACTOR_OFFSETS = (8, 16, 24)
WORD_STRIDE = 17
CHOICES = 4


def _chapters() -> list[tuple[int, tuple[str, ...]]]:
    return [(i, v) for i, v in enumerate(chapter_verses()) if split_of(i) == "eval"]


def _positions():
    """(chapter slot, chapter index, verses, fraction, verse position) of every document, in order."""
    for c, (index, verses) in enumerate(_chapters()):
        for frac in POSITIONS:
            yield c, index, verses, frac, max(1, round(frac * len(verses)))


def _place(answer: str, distractors: list[str], n: int) -> tuple[list[str], int]:
    label = n % CHOICES
    return distractors[:label] + [answer] + distractors[label:], label


def _head(verse: str) -> str:
    return " ".join(verse.split()[:CHOICE_WORDS])


def next_verse_documents() -> list[dict[str, Any]]:
    """``kjv_next_verse``'s documents: ``{"id", "context", "choices", "label"}``, in a fixed order."""
    chapters = _chapters()
    docs = []
    for c, index, verses, frac, pos in _positions():
        others = [chapters[(c + off) % len(chapters)][1] for off in DISTRACTOR_OFFSETS]
        distractors = [_head(v[min(len(v) - 1, round(frac * len(v)))]) for v in others]
        choices, label = _place(_head(verses[pos]), distractors, len(docs))
        context = " ".join(verses[max(0, pos - CONTEXT_VERSES) : pos])
        docs.append({"id": f"c{index}-v{pos}", "context": context, "choices": choices, "label": label})
    return docs


def next_word_documents() -> list[dict[str, Any]]:
    """``kjv_next_word``'s documents: ``{"id", "context", "choices", "label"}``, in a fixed order."""
    items = []
    for _, index, verses, _, pos in _positions():
        words = verses[pos].split()
        half = len(words) // 2
        items.append((f"c{index}-v{pos}-w{half}", " ".join([verses[pos - 1], *words[:half]]), words[half]))
    docs = []
    for i, (doc_id, context, answer) in enumerate(items):
        distractors, j = [], i
        while len(distractors) < CHOICES - 1:
            j = (j + WORD_STRIDE) % len(items)
            if items[j][2] != answer and items[j][2] not in distractors:
                distractors.append(items[j][2])
        choices, label = _place(answer, distractors, i)
        docs.append({"id": doc_id, "context": context, "choices": choices, "label": label})
    return docs


def _dataset(docs: list[dict[str, Any]]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def next_verse(**_: Any):
    """``custom_dataset`` of ``kjv_next_verse.yaml``: one ``test`` split."""
    return _dataset(next_verse_documents())


def next_word(**_: Any):
    """``custom_dataset`` of ``kjv_next_word.yaml``: one ``test`` split."""
    return _dataset(next_word_documents())
