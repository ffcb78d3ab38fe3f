"""Representation forgetting of the grid's encoder students (``sadlora.forgetting``).

For every finished run the merged student's mean-pooled sentence embeddings are compared with
those of its pretrained base on held-out STS-B test pairs (no recipe of the project trains on
that split): the drop of the cosine-similarity Spearman and the mean embedding cosine to the
base, written to ``<run>/forgetting.json``. The base's embeddings are computed once per task,
and only when a run still needs measuring.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..forgetting import representation_forgetting, sts_probe, stsb_pairs
from ..runs import load_model, write_json
from ..student import load_student

__all__ = ["ForgettingProbe", "FORGETTING_FILE"]

logger = logging.getLogger(__name__)

FORGETTING_FILE = "forgetting.json"


class ForgettingProbe:
    """The first ``pairs`` STS-B test pairs and the base student's embeddings of them.

    Args:
        student_model: the students' pretrained base (name or folder).
        spec: the task's TaskSpec (its head is built but never used: embeddings are read from
            the last hidden layer).
        pairs: number of sentence pairs (at most the 1379 of the split).
    """

    def __init__(self, student_model: str, spec, pairs: int) -> None:
        self.student_model, self.spec = student_model, spec
        self.first, self.second, self.scores = stsb_pairs("test", pairs)
        self._base: tuple | None = None  # (tokenizer, base probe), on the first measurement

    def _base_probe(self) -> tuple:
        if self._base is None:
            base, tokenizer = load_model(self.student_model, self.spec)
            self._base = (tokenizer, sts_probe(base, tokenizer, self.first, self.second))
        return self._base

    def measure(self, run_dir: Path) -> dict:
        """``representation_forgetting`` of the merged student saved in ``run_dir``; cached in
        ``run_dir/forgetting.json`` (a finished run is measured once)."""
        path = Path(run_dir) / FORGETTING_FILE
        if path.is_file():
            return json.loads(path.read_text())
        tokenizer, base_probe = self._base_probe()
        base, _ = load_model(self.student_model, self.spec)
        merged = load_student(base, run_dir).merge_and_unload()
        result = representation_forgetting(None, merged, tokenizer, self.first, self.second,
                                           self.scores, base_probe=base_probe)
        result["pairs"] = len(self.scores)
        write_json(path, result)
        logger.info("forgetting of %s: spearman %.4f -> %.4f", run_dir,
                    result["base_spearman"], result["spearman"])
        return result
