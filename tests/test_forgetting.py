"""Forgetting metrics on tiny random models: generic-text perplexity of a causal LM and the
STS cosine-similarity Spearman / embedding drift of an encoder, against exact oracles."""

import math

import pytest
import torch
from tiny_models import save_tiny_bert, save_tiny_llama, sentiment_rows
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from sadlora.forgetting import (
    causal_lm_perplexity,
    lm_forgetting,
    mean_pooled_embeddings,
    representation_forgetting,
    sts_cosine_spearman,
    stsb_pairs,
    stsb_sentences,
)
from sadlora.runs import load_model

TEXTS = [r["text"] for r in sentiment_rows(12, seed=3)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_model(str(save_tiny_llama(tmp_path_factory.mktemp("llama"))), None)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = save_tiny_bert(tmp_path_factory.mktemp("bert"))
    return folder, AutoTokenizer.from_pretrained(folder)


def test_perplexity_of_uniform_logits_is_the_vocabulary_size(llama):
    model, tokenizer = llama
    with torch.no_grad():
        model.lm_head.weight.zero_()
        result = causal_lm_perplexity(model, tokenizer, TEXTS, batch_size=5)
    assert result["perplexity"] == pytest.approx(model.config.vocab_size, rel=1e-5)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert result["tokens"] == sum(n - 1 for n in lengths)  # first token has no context


def test_perplexity_ignores_padding_and_forgetting_compares_runs(tmp_path):
    model, tokenizer = load_model(str(save_tiny_llama(tmp_path / "m", seed=4)), None)
    one = causal_lm_perplexity(model, tokenizer, TEXTS, batch_size=1)
    many = causal_lm_perplexity(model, tokenizer, TEXTS, batch_size=7)
    assert many["nll"] == pytest.approx(one["nll"], rel=1e-5)
    assert lm_forgetting(one, one)["perplexity_ratio"] == 1.0
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # sharper, wrong predictions: more perplexed
    after = causal_lm_perplexity(model, tokenizer, TEXTS)
    change = lm_forgetting(one, after)
    assert change["perplexity_ratio"] == pytest.approx(math.exp(change["nll_increase"]))
    assert change["perplexity_ratio"] > 1.0
    with pytest.raises(ValueError, match="different texts"):
        lm_forgetting(one, causal_lm_perplexity(model, tokenizer, TEXTS[:3]))


def test_mean_pooling_is_padding_invariant_and_head_independent(bert):
    folder, tokenizer = bert
    encoder = AutoModel.from_pretrained(folder)
    classifier = AutoModelForSequenceClassification.from_pretrained(folder)
    alone = mean_pooled_embeddings(encoder, tokenizer, [TEXTS[0]])
    batched = mean_pooled_embeddings(encoder, tokenizer, TEXTS[:6], batch_size=6)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean_pooled_embeddings(classifier, tokenizer, TEXTS[:6]), batched)


def test_representation_forgetting(bert):
    folder, tokenizer = bert
    base = AutoModelForSequenceClassification.from_pretrained(folder)
    first, second = TEXTS[:6], TEXTS[6:]
    with torch.no_grad():
        gold = torch.nn.functional.cosine_similarity(
            mean_pooled_embeddings(base, tokenizer, first),
            mean_pooled_embeddings(base, tokenizer, second)).tolist()
    # Gold scores equal to the base model's own cosines: Spearman 1 for the base.
    assert sts_cosine_spearman(base, tokenizer, first, second, gold) == pytest.approx(1.0)
    same = representation_forgetting(base, base, tokenizer, first, second, gold)
    assert same["spearman_drop"] == 0.0
    assert same["embedding_cosine_to_base"] == pytest.approx(1.0, abs=1e-6)
    changed = AutoModelForSequenceClassification.from_pretrained(folder)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in changed.bert.encoder.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    moved = representation_forgetting(base, changed, tokenizer, first, second, gold)
    assert moved["embedding_cosine_to_base"] < 0.999
    assert moved["spearman_drop"] == pytest.approx(1.0 - moved["spearman"])
    with pytest.raises(ValueError, match="scores for"):
        sts_cosine_spearman(base, tokenizer, first, second, gold[:2])


def test_packaged_stsb_test_text():
    first, second, scores = stsb_pairs("test", count=5)
    assert len(first) == len(second) == len(scores) == 5
    assert all(0.0 <= s <= 5.0 for s in scores)
    sentences = stsb_sentences("test", count=20)
    assert len(sentences) == len(set(sentences)) == 20
