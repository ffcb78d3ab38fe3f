"""Templated instruction data built from the packaged labelled tasks (ASSETS.md).

No instruction set ships in a package, so instructions are made from labelled data:

- ``rotten_tomatoes``: "Classify the sentiment of this movie review ..." -> ``answer: positive``
  or ``answer: negative`` (train / validation splits of the movie-disjoint split).
- ``stsb``: "Rate how similar the two sentences are ..." -> ``answer: k`` with k the gold
  score (0-5) rounded to an integer (STS-B train / validation; the test split is left
  untouched, it is the held-out generic text of the forgetting metric).

The answers are short and closed-form, so greedy generation can be scored by exact match.
Long texts are cut to ``max_words`` words *inside the prompt*, so truncation to the model's
max_length never cuts the response.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence

from datasets import Dataset, DatasetDict

__all__ = ["TEMPLATES", "templated_instructions", "sentiment_row", "similarity_row",
           "normalise_answer"]

SENTIMENT_PROMPT = ("Classify the sentiment of this movie review as positive or negative.\n"
                    "Review: {text}")
SIMILARITY_PROMPT = ("Rate how similar the two sentences are in meaning, from 0 (unrelated) "
                     "to 5 (equivalent).\nSentence 1: {first}\nSentence 2: {second}")


def _cut(text: str, max_words: int) -> str:
    words = text.split()
    return " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")


def sentiment_row(text: str, label: int, max_words: int = 40) -> dict:
    """{"prompt", "response", "task"} of one Rotten Tomatoes snippet (label 1 = fresh)."""
    return {"prompt": SENTIMENT_PROMPT.format(text=_cut(text, max_words)),
            "response": f"answer: {'positive' if label else 'negative'}",
            "task": "rotten_tomatoes"}


def similarity_row(first: str, second: str, score: float, max_words: int = 40) -> dict:
    """{"prompt", "response", "task"} of one STS-B pair; the answer is round(score) in 0..5."""
    if not 0.0 <= score <= 5.0:
        raise ValueError(f"STS-B scores lie in [0, 5], got {score}.")
    return {"prompt": SIMILARITY_PROMPT.format(first=_cut(first, max_words),
                                               second=_cut(second, max_words)),
            "response": f"answer: {int(score + 0.5)}", "task": "stsb"}


@functools.lru_cache(maxsize=4)
def _rotten_tomatoes(seed: int) -> DatasetDict:
    from .tasks import load_rotten_tomatoes

    return load_rotten_tomatoes(seed=seed)  # read once per process: a pipeline asks often


@functools.lru_cache(maxsize=1)
def _stsb() -> DatasetDict:
    from .tasks import load_embedded_stsb

    return load_embedded_stsb()


def _sentiment_rows(split: str, count: int, seed: int, max_words: int) -> list[dict]:
    rows = _rotten_tomatoes(seed)[split].shuffle(seed=seed)
    rows = rows.select(range(min(count, len(rows))))
    return [sentiment_row(r["text"], r["label"], max_words) for r in rows]


def _similarity_rows(split: str, count: int, seed: int, max_words: int) -> list[dict]:
    if split == "test":
        raise ValueError("the STS-B test split is reserved for the forgetting metric.")
    rows = _stsb()[split].shuffle(seed=seed)
    rows = rows.select(range(min(count, len(rows))))
    return [similarity_row(r["sentence1"], r["sentence2"], r["label"], max_words) for r in rows]


TEMPLATES = {"rotten_tomatoes": _sentiment_rows, "stsb": _similarity_rows}


def templated_instructions(tasks: Sequence[str] = ("rotten_tomatoes", "stsb"), *,
                           train_per_task: int = 200, eval_per_task: int = 50,
                           max_words: int = 40, seed: int = 0) -> DatasetDict:
    """DatasetDict(train, validation) with columns prompt, response, task; tasks interleaved
    by a seeded shuffle. ``*_per_task`` rows of each task (fewer if the split is smaller)."""
    unknown = [t for t in tasks if t not in TEMPLATES]
    if unknown or not tasks:
        raise ValueError(f"unknown template task(s) {unknown or tasks}; choose among "
                         f"{sorted(TEMPLATES)}.")
    out = {}
    for split, count in (("train", train_per_task), ("validation", eval_per_task)):
        rows = [row for task in tasks for row in TEMPLATES[task](split, count, seed, max_words)]
        random.Random(seed).shuffle(rows)
        out[split] = Dataset.from_list(rows)
    return DatasetDict(out)


def normalise_answer(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation: what exact match compares."""
    return " ".join(text.lower().split()).rstrip(" .!")
