"""Forgetting metrics: how much of the pretrained model an adaptation destroys.

Two measurements, each a function of (model, tokenizer, data) so that every method (LoRA, KD,
SAD-LoRA, full fine-tuning) is measured the same way:

- Causal LMs: perplexity on held-out generic text the model never trained on, before and after
  adaptation (``causal_lm_perplexity``, ``lm_forgetting``).
  ``ppl = exp( sum_t -log p(x_{t+1} | x_{<=t}) / #scored tokens )`` over every non-padding
  token that has a left context (the first token of a text is not scored).
- Encoders: the change of the pretrained representation, measured on STS-B: the Spearman
  correlation between gold similarity scores and ``cos(e(s1), e(s2))``, with ``e`` the
  attention-masked mean of the last hidden layer (the sentence-transformers pooling of MiniLM /
  MPNet), for the (merged) student against the base model (``representation_forgetting``).
  Also the mean cosine between the base and student embeddings of the same sentence
  (1 = representation unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["causal_lm_perplexity", "lm_forgetting", "mean_pooled_embeddings", "sts_probe",
           "sts_cosine_spearman", "representation_forgetting", "stsb_pairs", "stsb_sentences"]


def _batches(items: Sequence, size: int):
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}.")
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------
# Causal LMs
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def causal_lm_perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 16,
                         max_length: int = 128, bf16: bool = False) -> dict[str, float]:
    """Perplexity of ``model`` on plain ``texts`` (no template), padding-invariant.

    Each text is tokenised alone (truncated to ``max_length`` tokens), batches are right-padded
    and padding never enters the sum. Returns ``{"nll", "perplexity", "tokens", "texts"}``:
    mean next-token negative log-likelihood (nats), exp of it, scored tokens, number of texts.
    """
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("causal_lm_perplexity needs at least one non-empty text.")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token = eos_token.")
    device, was_training = _device(model), model.training
    model.eval()
    nll, tokens = 0.0, 0
    for chunk in _batches(texts, batch_size):
        encoded = tokenizer(chunk, add_special_tokens=False, truncation=True,
                            max_length=max_length)
        width = max(len(ids) for ids in encoded["input_ids"])
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(encoded["input_ids"]):
            ids[row, :len(sequence)] = torch.tensor(sequence)
            mask[row, :len(sequence)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
            ignore_index=-100, reduction="sum"))
        tokens += int((targets != -100).sum())
    model.train(was_training)
    if tokens == 0:
        raise ValueError("no token was scored: every text is a single token long.")
    mean = nll / tokens
    return {"nll": mean, "perplexity": math.exp(mean), "tokens": tokens, "texts": len(texts)}


def lm_forgetting(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Generic-text forgetting from two ``causal_lm_perplexity`` results (same texts).

    ``perplexity_ratio`` = ppl_after / ppl_before (1 = nothing forgotten, > 1 = forgetting);
    ``nll_increase`` = nll_after - nll_before (nats per token) = log of the ratio.
    """
    if before.get("tokens") != after.get("tokens"):
        raise ValueError(f"before/after were scored on different texts ({before.get('tokens')} "
                         f"vs {after.get('tokens')} tokens): use the same texts and tokenizer.")
    return {"perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
            "perplexity_ratio": after["perplexity"] / before["perplexity"],
            "nll_increase": after["nll"] - before["nll"]}


# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def mean_pooled_embeddings(model, tokenizer, sentences: Sequence[str], *, batch_size: int = 64,
                           max_length: int = 128) -> torch.Tensor:
    """(N, hidden) float32 attention-masked means of the last hidden layer.

    Works for a bare encoder (``last_hidden_state``), a sequence-classification model, a PEFT
    student or its merged model (``hidden_states[-1]``): the head is not used.
    """
    device, was_training = _device(model), model.training
    model.eval()
    pooled = []
    for chunk in _batches(list(sentences), batch_size):
        batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        output = model(**batch, output_hidden_states=True)
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            hidden = output.hidden_states[-1]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).float().cpu())
    model.train(was_training)
    return torch.cat(pooled)


def _spearman(first: np.ndarray, second: np.ndarray) -> float:
    from scipy import stats

    if np.ptp(first) == 0 or np.ptp(second) == 0:
        return 0.0  # undefined for a constant vector: report "no correlation"
    return float(stats.spearmanr(first, second)[0])


def sts_probe(model, tokenizer, sentence1, sentence2, **kwargs) -> tuple:
    """(cosines (N,) float64 numpy, embeddings of sentence1 (N, h), of sentence2 (N, h)) of
    mean-pooled ``model`` embeddings; reusable as ``representation_forgetting``'s base."""
    if len(sentence1) != len(sentence2) or not sentence1:
        raise ValueError(f"need equally many (> 0) first and second sentences, got "
                         f"{len(sentence1)} and {len(sentence2)}.")
    first = mean_pooled_embeddings(model, tokenizer, sentence1, **kwargs)
    second = mean_pooled_embeddings(model, tokenizer, sentence2, **kwargs)
    cosine = torch.nn.functional.cosine_similarity(first, second, dim=-1)
    return cosine.double().numpy(), first, second


def sts_cosine_spearman(model, tokenizer, sentence1: Sequence[str], sentence2: Sequence[str],
                        scores: Sequence[float], **kwargs) -> float:
    """Spearman rho between gold ``scores`` and cos(e(s1), e(s2)) of mean-pooled embeddings."""
    cosine, _, _ = sts_probe(model, tokenizer, sentence1, sentence2, **kwargs)
    if len(scores) != len(cosine):
        raise ValueError(f"{len(scores)} scores for {len(cosine)} sentence pairs.")
    return _spearman(cosine, np.asarray(scores, dtype=np.float64))


def representation_forgetting(base_model, model, tokenizer, sentence1: Sequence[str],
                              sentence2: Sequence[str], scores: Sequence[float], *,
                              base_probe: tuple | None = None, **kwargs) -> dict[str, float]:
    """How far ``model`` (e.g. the merged student) moved from ``base_model``'s representation.

    Returns ``base_spearman``, ``spearman`` (the model's STS cosine Spearman), ``spearman_drop``
    = base - model (> 0: the pretrained similarity structure was damaged) and
    ``embedding_cosine_to_base``: mean over all sentences of cos(e_base(s), e_model(s)).
    Both models must share ``tokenizer`` (the student and its base do). ``base_probe``: the
    base's ``sts_probe`` on the same sentences, computed once for many models (``base_model``
    is then not run and may be None).
    """
    gold = np.asarray(scores, dtype=np.float64)
    if base_probe is None:
        base_probe = sts_probe(base_model, tokenizer, sentence1, sentence2, **kwargs)
    base_cos, base_1, base_2 = base_probe
    cos, new_1, new_2 = sts_probe(model, tokenizer, sentence1, sentence2, **kwargs)
    if len(gold) != len(cos):
        raise ValueError(f"{len(gold)} scores for {len(cos)} sentence pairs.")
    drift = torch.nn.functional.cosine_similarity(torch.cat([base_1, base_2]),
                                                  torch.cat([new_1, new_2]), dim=-1)
    base, student = _spearman(base_cos, gold), _spearman(cos, gold)
    return {"base_spearman": base, "spearman": student, "spearman_drop": base - student,
            "embedding_cosine_to_base": float(drift.mean())}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def stsb_pairs(split: str = "test", count: int | None = None,
               data_dir: str | None = None) -> tuple[list[str], list[str], list[float]]:
    """(sentence1, sentence2, gold score) lists of the packaged STS-B ``split`` (first ``count``).

    The STS-B test split is used by no training recipe here, so it is held-out text for every
    model of the project.
    """
    from .tasks import load_embedded_stsb

    data = load_embedded_stsb(data_dir)
    if split not in data:
        raise ValueError(f"STS-B has splits {list(data)}, not {split!r}.")
    rows = data[split]
    rows = rows.select(range(min(count, len(rows)))) if count is not None else rows
    return list(rows["sentence1"]), list(rows["sentence2"]), [float(x) for x in rows["label"]]


def stsb_sentences(split: str = "test", count: int | None = None,
                   data_dir: str | None = None) -> list[str]:
    """Distinct STS-B sentences of ``split`` (first ``count``): generic held-out English text."""
    first, second, _ = stsb_pairs(split, None, data_dir)
    unique = list(dict.fromkeys(s.strip() for pair in zip(first, second) for s in pair))
    return unique[:count] if count is not None else unique
