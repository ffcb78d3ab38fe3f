"""Calibration hooks on tiny random transformers built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from sadlora.calibration import (
    collect_second_moments,
    collect_update_grams,
    linear_weight,
    resolve_target_modules,
)
from sadlora.spectral import SecondMoment, data_weighted_subspace

QUERY0 = "bert.encoder.layer.0.attention.self.query"
KEY0 = "bert.encoder.layer.0.attention.self.key"
VALUE0 = "bert.encoder.layer.0.attention.self.value"
FFN0 = "bert.encoder.layer.0.intermediate.dense"
QUERY1 = "bert.encoder.layer.1.attention.self.query"
OUT1 = "bert.encoder.layer.1.output.dense"


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    return BertForSequenceClassification(config).double().eval()


def make_sequences(count: int = 8, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 10, (count,), generator=generator)
    return [torch.randint(1, 100, (int(n),), generator=generator) for n in lengths]


def make_batches(sequences, batch_size: int, pad_id: int = 0) -> list[dict]:
    """Collator-like batches, each padded to its own longest sequence."""
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "labels": torch.zeros(len(chunk), dtype=torch.long)})
    return batches


@pytest.fixture(scope="module")
def model():
    return tiny_bert()


@pytest.fixture(scope="module")
def batches():
    return make_batches(make_sequences(), batch_size=4)


def capture_inputs(model, batches, name) -> torch.Tensor:
    """Oracle: the non-padding input rows (n, d_in) of one layer, by a separate plain hook."""
    rows = []

    def hook(module, args):
        rows.append(args[0].reshape(-1, args[0].shape[-1]).clone())

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch in batches:
                start = len(rows)
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                keep = batch["attention_mask"].reshape(-1).bool()
                rows[start:] = [r[keep] for r in rows[start:]]
    finally:
        handle.remove()
    return torch.cat(rows)


# -- resolve_target_modules ------------------------------------------------------------------


def test_resolve_matches_suffixes_and_full_names(model):
    assert resolve_target_modules(model, ["query"]) == [QUERY0, QUERY1]
    assert resolve_target_modules(model, "value") == [VALUE0, VALUE0.replace("0", "1")]
    assert resolve_target_modules(model, [FFN0]) == [FFN0]
    # "dense" matches every ".dense" layer, "ery" (a partial suffix) matches nothing.
    assert len(resolve_target_modules(model, ["dense"])) == 7
    with pytest.raises(ValueError, match="ery"):
        resolve_target_modules(model, ["ery"])


def test_resolve_error_lists_existing_linear_suffixes(model):
    with pytest.raises(ValueError) as error:
        resolve_target_modules(model, ["q_proj", "v_proj"])
    message = str(error.value)
    for suffix in ("query", "key", "value", "dense", "classifier"):
        assert f"'{suffix}'" in message
    with pytest.raises(ValueError, match="empty"):
        resolve_target_modules(model, [])


# -- second moments --------------------------------------------------------------------------


@pytest.mark.parametrize("name", [QUERY0, FFN0, OUT1])
def test_masked_accumulation_equals_manual(model, batches, name):
    moments = collect_second_moments(model, batches, [name], progress=False)
    x = capture_inputs(model, batches, name)
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert x.shape[0] == n_real and moments[name].count == n_real
    assert torch.allclose(moments[name].mean(), x.T @ x / n_real, rtol=0, atol=1e-10)


def test_query_key_value_share_one_accumulator(model, batches):
    names = [QUERY0, KEY0, VALUE0, FFN0, QUERY1, OUT1]
    moments = collect_second_moments(model, batches, names, progress=False)
    assert moments[QUERY0] is moments[KEY0] is moments[VALUE0]
    distinct = {id(moments[n]) for n in (QUERY0, FFN0, QUERY1, OUT1)}
    assert len(distinct) == 4
    # Shared, the input is counted once, not three times.
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert moments[KEY0].count == n_real


def test_batch_split_and_padding_invariance(model):
    sequences = make_sequences()
    names = [QUERY0, FFN0, QUERY1, OUT1]
    small = collect_second_moments(model, make_batches(sequences, 2), names, progress=False)
    large = collect_second_moments(model, make_batches(sequences, 4), names, progress=False)
    # The content of padded positions must not matter either.
    noisy = make_batches(sequences, 4, pad_id=7)
    padded = collect_second_moments(model, noisy, names, progress=False)
    for name in names:
        assert small[name].count == large[name].count == padded[name].count
        for other in (large, padded):
            assert torch.allclose(small[name].mean(), other[name].mean(), rtol=0, atol=1e-10)


def test_each_distinct_accumulator_is_all_reduced_once(model, batches, monkeypatch):
    calls = []
    original = SecondMoment.all_reduce
    monkeypatch.setattr(SecondMoment, "all_reduce", lambda self: calls.append(self) or
                        original(self))
    moments = collect_second_moments(model, batches, [QUERY0, KEY0, VALUE0, FFN0],
                                     progress=False)
    assert len(calls) == 2 and calls[0] is moments[QUERY0] and calls[1] is moments[FFN0]


def test_max_batches_and_mode_restored(model, batches):
    model.train()
    try:
        moments = collect_second_moments(model, batches, [QUERY0], max_batches=1, progress=False)
        assert model.training, "the caller's training mode is restored"
    finally:
        model.eval()
    assert moments[QUERY0].count == int(batches[0]["attention_mask"].sum())
    assert moments[QUERY0].sum.dtype == torch.float64 and not moments[QUERY0].sum.requires_grad


def test_generator_and_torch_dataloader_with_progress_bar(model, batches):
    reference = collect_second_moments(model, batches, [QUERY0], progress=False)[QUERY0]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)  # yields the dicts as-is
    for source in (loader, (batch for batch in batches)):  # with and without __len__
        moment = collect_second_moments(model, source, [QUERY0], device="cpu")[QUERY0]
        assert torch.equal(moment.sum, reference.sum) and moment.count == reference.count


def test_hooks_removed_after_success_and_exception(model, batches):
    modules = [model.get_submodule(n) for n in (QUERY0, FFN0)]
    collect_second_moments(model, batches, [QUERY0, FFN0], progress=False)
    assert all(len(m._forward_pre_hooks) == 0 for m in modules)
    bad = [{"input_ids": torch.full((1, 3), 1000), "attention_mask": torch.ones(1, 3)}]
    with pytest.raises(IndexError):  # token id outside the vocabulary: the forward fails
        collect_second_moments(model, bad, [QUERY0, FFN0], progress=False)
    assert all(len(m._forward_pre_hooks) == 0 for m in modules)


def test_clear_errors_for_empty_or_all_padding_or_bad_input(model, batches):
    with pytest.raises(ValueError, match="no batches"):
        collect_second_moments(model, [], [QUERY0], progress=False)
    padding = [{**batches[0], "attention_mask": torch.zeros_like(batches[0]["attention_mask"])}]
    with pytest.raises(ValueError, match="attention masks .* all zero"):
        collect_second_moments(model, padding, [QUERY0], progress=False)
    with pytest.raises(ValueError, match="no module named"):
        collect_second_moments(model, batches, ["bert.encoder.layer.9.query"], progress=False)
    with pytest.raises(ValueError, match="max_batches"):
        collect_second_moments(model, batches, [QUERY0], max_batches=0, progress=False)
    with pytest.raises(ValueError, match="mappings"):
        collect_second_moments(model, [batches[0]["input_ids"]], [QUERY0], progress=False)


def test_pooler_input_is_per_example(model, batches):
    name = "bert.pooler.dense"
    moments = collect_second_moments(model, batches, [name], progress=False)
    assert moments[name].count == sum(b["input_ids"].shape[0] for b in batches)


def test_conv1d_layers_of_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    gpt = GPT2LMHeadModel(config).double().eval()
    names = resolve_target_modules(gpt, ["c_attn"])
    assert names == ["transformer.h.0.attn.c_attn"]
    assert tuple(linear_weight(gpt.get_submodule(names[0])).shape) == (48, 16)
    data = make_batches([s % 50 for s in make_sequences(6)], 3)
    moments = collect_second_moments(gpt, data, names, progress=False)
    x = capture_inputs(gpt, data, names[0])
    assert torch.allclose(moments[names[0]].mean(), x.T @ x / x.shape[0], atol=1e-10)


# -- K accumulation --------------------------------------------------------------------------


def test_gram_route_equals_sigma_route(model, batches):
    generator = torch.Generator().manual_seed(3)
    names = [QUERY0, KEY0, FFN0]
    deltas = {n: torch.randn(linear_weight(model.get_submodule(n)).shape, generator=generator,
                             dtype=torch.float64) for n in names}
    grams = collect_update_grams(model, batches, deltas, progress=False)
    moments = collect_second_moments(model, batches, names, progress=False)
    for name in names:
        assert grams[name] is not moments[name]
        assert grams[name].count == moments[name].count
        from_gram = data_weighted_subspace(None, gram=grams[name].mean(), k=8)
        from_sigma = data_weighted_subspace(deltas[name], moments[name].mean(), k=8)
        assert torch.allclose(from_gram.singular_values, from_sigma.singular_values, atol=1e-8)
        assert torch.allclose(from_gram.total_energy, from_sigma.total_energy, atol=1e-8)
        # The spectrum of a random dW is simple, so the (sign-fixed) vectors agree too.
        assert torch.allclose(from_gram.basis, from_sigma.basis, atol=1e-8)


def test_gram_rejects_wrong_delta_shape(model, batches):
    with pytest.raises(ValueError, match="shape"):
        collect_update_grams(model, batches, {FFN0: torch.zeros(32, 32)}, progress=False)
