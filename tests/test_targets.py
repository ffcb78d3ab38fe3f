"""Building, saving and loading spectral targets on tiny random BERTs (no downloads)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from sadlora.calibration import collect_second_moments
from sadlora.targets import (
    LayerTarget,
    SpectralTargets,
    build_targets,
    load_targets,
    model_fingerprint,
    save_targets,
    task_updates,
)

TARGETS = ["query", "key", "value", "intermediate.dense"]
QUERY0 = "bert.encoder.layer.0.attention.self.query"
VALUE0 = "bert.encoder.layer.0.attention.self.value"


def make_sequences(count: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 10, (count,), generator=generator)
    return [torch.randint(1, 100, (int(n),), generator=generator) for n in lengths]


def make_batches(sequences, batch_size: int) -> list[dict]:
    """Collator-like batches, each padded (id 0) to its own longest sequence."""
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        ids = torch.zeros(len(chunk), max(len(s) for s in chunk), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "labels": torch.zeros(len(chunk), dtype=torch.long)})
    return batches


@torch.no_grad()
def capture_inputs(model, batches, name) -> torch.Tensor:
    """Oracle: the non-padding input rows (n, d_in) of one layer, by a separate plain hook."""
    rows = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda module, args: rows.append(args[0]))
    try:
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            rows[-1] = rows[-1][batch["attention_mask"].bool()]
    finally:
        handle.remove()
    return torch.cat(rows)


def bert(hidden: int = 32, intermediate: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=intermediate,
                        max_position_embeddings=32)
    return BertForSequenceClassification(config).double().eval()


def perturbed(model, scale: float = 0.05, seed: int = 1):
    teacher = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator,
                                               dtype=parameter.dtype))
    return teacher


@pytest.fixture(scope="module")
def base():
    return bert()


@pytest.fixture(scope="module")
def teacher(base):
    return perturbed(base)


@pytest.fixture(scope="module")
def batches():
    return make_batches(make_sequences(12), batch_size=4)


@pytest.fixture(scope="module")
def fixed(teacher, base, batches):
    return build_targets(teacher, base, batches, TARGETS, rank=4, max_rank=16, keep_sigma=True,
                         keep_delta_w=True, progress=False)


@torch.no_grad()
def oracle_kernel(teacher, base, batches, name):
    """K = dW Sigma dW^T from independently captured non-padding inputs, float64."""
    x = capture_inputs(base, batches, name)
    delta = teacher.get_submodule(name).weight - base.get_submodule(name).weight
    return delta @ (x.T @ x / x.shape[0]) @ delta.T


# -- build -----------------------------------------------------------------------------------


def test_fixed_rank_targets_match_the_oracle(fixed, teacher, base, batches):
    assert len(fixed.layers) == 8 and fixed.ranks == dict.fromkeys(fixed.layers, 4)
    for name in (QUERY0, "bert.encoder.layer.1.intermediate.dense"):
        target = fixed.layers[name]
        d_out = target.d_out
        assert target.basis.shape == (d_out, 16) and target.basis.dtype == torch.float32
        assert torch.allclose(target.basis.T @ target.basis, torch.eye(16), atol=1e-5)
        values = target.singular_values
        assert values.shape == (16,) and bool((values[:-1] >= values[1:]).all())
        kernel = oracle_kernel(teacher, base, batches, name)
        eigenvalues, eigenvectors = torch.linalg.eigh(kernel)
        assert math.isclose(float(target.total_energy), float(torch.trace(kernel)), rel_tol=1e-6)
        assert torch.allclose(values.double().square(), eigenvalues.flip(0)[:16], rtol=1e-5,
                              atol=1e-9)
        top = eigenvectors.flip(1)[:, :4]  # compare subspaces: projectors, sign-free
        basis = target.basis[:, :4].double()
        assert torch.allclose(basis @ basis.T, top @ top.T, atol=1e-5)
        assert math.isclose(target.gap, float(values[3] / values[4]), rel_tol=1e-6)


def test_energy_threshold_ranks_follow_theorem_2(teacher, base, batches):
    ranks = {}
    for threshold in (0.5, 0.9):
        targets = build_targets(teacher, base, batches, ["query"], energy_threshold=threshold,
                                max_rank=32, progress=False)
        ranks[threshold] = targets.ranks
        for name, target in targets.layers.items():
            eigenvalues = torch.linalg.eigvalsh(oracle_kernel(teacher, base, batches, name))
            kept = torch.cumsum(eigenvalues.flip(0), 0)
            expected = int(torch.nonzero(kept >= threshold * kept[-1])[0]) + 1
            assert target.rank == expected
    assert all(ranks[0.5][n] <= ranks[0.9][n] for n in ranks[0.5])
    assert max(ranks[0.9].values()) > 1


def test_budget_and_clipping(teacher, base, batches):
    targets = build_targets(teacher, base, batches, TARGETS, total_budget=20, max_rank=8,
                            progress=False)
    assert sum(targets.ranks.values()) == 20 and max(targets.ranks.values()) <= 8
    clipped = build_targets(teacher, base, batches, ["query"], energy_threshold=1.0, max_rank=3,
                            min_rank=2, progress=False)
    assert set(clipped.ranks.values()) == {3}


def test_keep_sigma_shared_and_delta_exact(fixed, teacher, base, batches):
    assert fixed.layers[QUERY0].sigma is fixed.layers[VALUE0].sigma
    moments = collect_second_moments(base, batches, [QUERY0], progress=False)
    assert torch.equal(fixed.layers[QUERY0].sigma, moments[QUERY0].mean().float())
    delta = teacher.get_submodule(QUERY0).weight - base.get_submodule(QUERY0).weight
    assert torch.equal(fixed.layers[QUERY0].delta_w, delta.detach().float())
    meta = fixed.metadata
    assert meta["fingerprint"] == model_fingerprint(base, list(fixed.layers))
    assert meta["calibration_tokens"][QUERY0] == sum(int(b["attention_mask"].sum())
                                                     for b in batches)
    assert meta["settings"]["rank"] == 4 and meta["settings"]["max_rank"] == 16


def test_gram_route_and_shrinkage(fixed, teacher, base, batches):
    gram = build_targets(teacher, base, batches, TARGETS, rank=4, max_rank=16, use_gram=True,
                         progress=False)
    for name, target in gram.layers.items():
        reference = fixed.layers[name]
        assert torch.allclose(target.singular_values, reference.singular_values, rtol=1e-5)
        assert torch.allclose(target.basis[:, :4], reference.basis[:, :4], atol=1e-4)
        assert target.sigma is None
    shrunk = build_targets(teacher, base, batches, ["query"], rank=2, shrinkage="oas",
                           keep_sigma=True, progress=False)
    moments = collect_second_moments(base, batches, [QUERY0], progress=False)
    assert torch.equal(shrunk.layers[QUERY0].sigma, moments[QUERY0].mean("oas").float())
    with pytest.raises(ValueError, match="use_gram"):
        build_targets(teacher, base, batches, ["query"], rank=2, use_gram=True, shrinkage="oas")


def test_calibration_model_is_used(teacher, base, batches):
    targets = build_targets(teacher, base, batches, ["query"], rank=2, keep_sigma=True,
                            calibration_model=teacher, progress=False)
    x = capture_inputs(teacher, batches, QUERY0)
    expected = (x.T @ x / x.shape[0]).float()
    assert torch.allclose(targets.layers[QUERY0].sigma, expected, rtol=1e-6, atol=1e-7)


def test_rank_settings_are_validated(teacher, base, batches):
    with pytest.raises(ValueError, match="exactly one"):
        build_targets(teacher, base, batches, ["query"], progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        build_targets(teacher, base, batches, ["query"], rank=2, energy_threshold=0.9)
    with pytest.raises(ValueError, match="rank=20"):
        build_targets(teacher, base, batches, ["query"], rank=20, max_rank=8, progress=False)


def test_architecture_mismatch_names_the_parameter(base, batches):
    other = perturbed(bert(intermediate=48))
    with pytest.raises(ValueError) as error:
        build_targets(other, base, batches, ["intermediate.dense"], rank=2, progress=False)
    message = str(error.value)
    assert "bert.encoder.layer.0.intermediate.dense.weight" in message
    assert "(48, 32)" in message and "(64, 32)" in message
    with pytest.raises(ValueError, match="no module 'bert.encoder.layer.0.attention.self.query'"):
        task_updates(BertModel(base.config), base, [QUERY0])


def test_zero_update_and_nonfinite_weights_are_rejected(base, batches):
    with pytest.raises(ValueError, match=f"update of {QUERY0} is zero"):
        build_targets(copy.deepcopy(base), base, batches, ["query"], rank=2, progress=False)
    broken = perturbed(base)
    with torch.no_grad():
        broken.get_submodule(VALUE0).weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"teacher parameter {VALUE0}.weight contains NaN"):
        build_targets(broken, base, batches, ["value"], rank=2, progress=False)


# -- save / load -----------------------------------------------------------------------------


def assert_same(a: SpectralTargets, b: SpectralTargets) -> None:
    assert list(a.layers) == list(b.layers) and a.metadata == b.metadata
    for name, target in a.layers.items():
        other = b.layers[name]
        assert (target.rank, target.gap) == (other.rank, other.gap)
        for key in ("basis", "singular_values", "total_energy", "sigma", "delta_w"):
            x, y = getattr(target, key), getattr(other, key)
            assert (x is None and y is None) or torch.equal(x, y), (name, key)


def test_exact_round_trip(fixed, base, tmp_path):
    save_targets(fixed, tmp_path / "t")
    loaded = load_targets(tmp_path / "t", model=base)
    assert_same(fixed, loaded)
    assert loaded.layers[QUERY0].sigma is loaded.layers[VALUE0].sigma  # stored once
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["targets.json",
                                                                  "targets.safetensors"]
    infinite = SpectralTargets({"a.b": LayerTarget(torch.eye(3, 2), torch.ones(2), torch.ones(()),
                                                   rank=2, gap=float("inf"))}, {"note": [1]})
    save_targets(infinite, tmp_path / "t")  # overwrite in place
    assert_same(infinite, load_targets(tmp_path / "t"))


def test_corrupted_truncated_and_missing_files(fixed, tmp_path):
    directory = save_targets(fixed, tmp_path / "t")
    tensor_file = directory / "targets.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[-5] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        load_targets(directory)
    tensor_file.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="truncated"):
        load_targets(directory)
    (directory / "targets.json").write_text('{"format": "sadlora-tar')
    with pytest.raises(ValueError, match="corrupted"):
        load_targets(directory)
    tensor_file.unlink()
    with pytest.raises(FileNotFoundError, match="targets.safetensors"):
        load_targets(directory)
    with pytest.raises(FileNotFoundError):
        load_targets(tmp_path / "nowhere")


def test_loading_for_another_model_fails(fixed, base, tmp_path):
    directory = save_targets(fixed, tmp_path / "t")
    wider = bert(hidden=48)
    with pytest.raises(ValueError, match=rf"{QUERY0}.*\(48, 48\).*\(32, 32\)"):
        load_targets(directory, model=wider)
    with pytest.raises(ValueError, match="has no module"):
        load_targets(directory, model=BertModel(base.config))
    with pytest.raises(ValueError, match="no layer"):
        load_targets(directory, model=base, module_names=["bert.pooler.dense"])
    document = json.loads((directory / "targets.json").read_text())
    assert document["metadata"]["fingerprint"]["model_type"] == "bert"


def test_unweighted_targets_are_the_plain_svd_of_the_update(teacher, base, batches):
    """data_weighted=False (the Sigma = I ablation): U and sigma~ are the SVD of dW itself."""
    targets = build_targets(teacher, base, batches, TARGETS, rank=4, max_rank=16,
                            data_weighted=False, keep_sigma=True, progress=False)
    target = targets.layers[QUERY0]
    delta = (teacher.get_submodule(QUERY0).weight - base.get_submodule(QUERY0).weight).double()
    left, values, _ = torch.linalg.svd(delta)
    assert torch.allclose(target.singular_values.double(), values[:16], rtol=1e-5)
    assert math.isclose(float(target.total_energy), float(delta.square().sum()), rel_tol=1e-6)
    basis = target.basis[:, :4].double()
    assert torch.allclose(basis @ basis.T, left[:, :4] @ left[:, :4].T, atol=1e-5)
    assert torch.equal(target.sigma, torch.eye(delta.shape[1]))
