"""Spectral analysis of trained adapters: the pure per-layer maths against independent oracles,
and the whole analysis on tiny BERT adapters of four initialisations (no training needed:
the identities hold for any adapter)."""

import json
import math

import pytest
import torch
from tiny_models import save_tiny_bert, write_sentiment_csv

from sadlora.adapter_analysis import (
    adapter_update_factors,
    data_weighted_singular_values,
    effective_rank,
    intruder_dimensions,
    random_direction_similarity,
)
from sadlora.commands import ExtractConfig, extract
from sadlora.experiments.spectral_analysis import SpectralAnalysisConfig, run_spectral_analysis
from sadlora.runs import load_model
from sadlora.student import build_student, lora_factors, save_student
from sadlora.targets import load_targets
from sadlora.tasks import load_custom_task

F64 = torch.float64


def _psd_sqrt(matrix):
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def test_update_factors_and_data_weighted_values_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(12, 3, generator=g, dtype=F64), torch.randn(3, 9, generator=g, dtype=F64)
    x = torch.randn(50, 9, generator=g, dtype=F64)
    sigma = x.T @ x / 50
    q, c = adapter_update_factors(b, a, scaling=2.0)
    torch.testing.assert_close(q @ c, 2.0 * b @ a)
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=F64))
    direct = torch.linalg.svdvals(2.0 * b @ a @ _psd_sqrt(sigma))[:3]
    torch.testing.assert_close(data_weighted_singular_values(q, c, sigma), direct)
    # A PiSSA-style shift of rank 2 widens the column space; a dead column of B narrows it.
    shift = torch.randn(12, 2, generator=g, dtype=F64) @ torch.randn(2, 9, generator=g,
                                                                       dtype=F64)
    q2, c2 = adapter_update_factors(b, a, 1.0, shift)
    assert q2.shape[1] == 5
    torch.testing.assert_close(q2 @ c2, b @ a + shift)
    b[:, 0] = 0
    assert adapter_update_factors(b, a)[0].shape[1] == 2
    with pytest.raises(ValueError, match="B is zero"):
        adapter_update_factors(torch.zeros(4, 2), torch.ones(2, 3))


def test_effective_rank():
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert 1.0 < effective_rank(torch.tensor([1.0, 0.1])) < 2.0
    assert effective_rank(torch.zeros(3)) == 0.0


def test_intruders_and_the_random_direction_baseline():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(200, 150, generator=g, dtype=F64)
    same = intruder_dimensions(w0, w0.clone(), top_k=5, threshold=0.5)
    assert same["count"] == 0 and min(same["similarities"]) == pytest.approx(1.0)
    # A strong rank-1 update along a random direction becomes the top singular vector, and it
    # looks like a random direction to W0's basis: an intruder.
    u = torch.randn(200, 1, generator=g, dtype=F64)
    v = torch.randn(1, 150, generator=g, dtype=F64)
    spike = w0 + 50.0 * torch.linalg.matrix_norm(w0, 2) * (u / u.norm()) @ (v / v.norm())
    result = intruder_dimensions(w0, spike, top_k=3, threshold=0.5)
    assert result["count"] >= 1 and result["similarities"][0] < 0.5
    # The random baseline against the standard basis of R^400 is max_i |g_i| / ||g||:
    # about sqrt(2 ln 400 / 400) ~ 0.17, far below 0.5.
    eye = torch.eye(400, dtype=F64)
    baseline = random_direction_similarity(eye, samples=500, threshold=0.5,
                                           generator=torch.Generator().manual_seed(2))
    assert 0.1 < baseline["mean"] < 0.3 and baseline["intruder_fraction"] == 1.0
    strict = random_direction_similarity(eye, samples=500, threshold=0.05,
                                         generator=torch.Generator().manual_seed(2))
    assert strict["intruder_fraction"] == 0.0  # max |g_i| / ||g|| >= 1/sqrt(400) = 0.05


@pytest.fixture(scope="module")
def adapter_runs(tmp_path_factory):
    """A tiny BERT base, a 'teacher' = base + a random update of query/value, targets, and
    four saved adapters (spectral, spectral_full, gaussian with random B, pissa)."""
    root = tmp_path_factory.mktemp("analysis")
    options = write_sentiment_csv(root, train=64, validation=16)
    common = dict(task="custom", task_options=options, max_length=32)
    spec = load_custom_task(**options)[0]
    save_tiny_bert(root / "base", hidden=32)
    teacher, _ = load_model(str(root / "base"), spec)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in teacher.named_modules():
            if name.endswith(("query", "value")):
                module.weight += 0.05 * torch.randn(module.weight.shape, generator=g)
    teacher.save_pretrained(root / "teacher")
    extract(ExtractConfig(spectral_teacher=str(root / "teacher"), base_model=str(root / "base"),
                          output_dir=str(root / "targets"), rank=4, max_rank=8,
                          calibration_examples=64, target_modules=["query", "value"],
                          progress=False, **common))
    targets = load_targets(root / "targets")
    runs = {}
    for init in ("spectral", "spectral_full", "gaussian", "pissa"):
        base, _ = load_model(str(root / "base"), spec)
        student = build_student(base, lora_rank=4, target_modules=["query", "value"], init=init,
                                targets=targets)
        if init in ("gaussian", "pissa"):  # stand-ins for trained adapters: B moved
            with torch.no_grad():  # (PEFT's gaussian init has B = 0; PiSSA's B = B0)
                for b, _ in lora_factors(student).values():
                    b.add_(torch.randn(b.shape, generator=g))
        save_student(student, root / init)
        (root / init / "sad_config.json").write_text(json.dumps(
            {"student_model": str(root / "base"), "method": init, **common}))
        runs[init] = str(root / init)
    config = SpectralAnalysisConfig(output_dir=str(root / "out"), runs=runs,
                                    targets=str(root / "targets"), intruder_top_k=4,
                                    random_directions=200, progress=False, log_level="WARNING")
    return root, run_spectral_analysis(config)


def test_decomposition_identity_holds_for_every_adapter(adapter_runs):
    _, results = adapter_runs
    for label, method in results["methods"].items():
        assert method["summary"]["layers"] == 4, label  # 2 layers x (query, value)
        for layer in method["layers"].values():
            terms = layer["decomposition"]
            assert terms["identity_residual"] < 1e-9, label
            assert terms["T_I"] >= -1e-9 * terms["trace_K"] and terms["T_II"] >= -1e-9 * \
                terms["trace_K"]


def test_spectral_inits_are_aligned_and_random_b_is_not(adapter_runs):
    _, results = adapter_runs
    methods = results["methods"]
    for init in ("spectral", "spectral_full"):
        for layer in methods[init]["layers"].values():
            assert layer["alignment"] == pytest.approx(1.0, abs=1e-6)
            assert max(layer["angles_deg"]) < 0.1
    for layer in methods["spectral_full"]["layers"].values():
        terms = layer["decomposition"]
        # B = U_r, A = U_r^T dW: the data-weighted optimum, only the rank residual remains.
        assert terms["T_I_relative"] < 1e-6 and terms["T_II_relative"] < 1e-5
        assert terms["total"] == pytest.approx(terms["T_III"], rel=1e-4)
        torch.testing.assert_close(torch.tensor(layer["adapter_values"]),
                                   torch.tensor(layer["target_values"]), rtol=1e-4, atol=1e-7)
    gaussian = methods["gaussian"]["summary"]
    assert gaussian["alignment"] < 0.6 and gaussian["random_alignment"] == pytest.approx(4 / 32)
    # PiSSA's effective update relative to W0 is s B A - s B0 A0 (the base weight became the
    # residual W0 - s B0 A0), here with B moved off B0: colspan([B, B0]) has rank 2r.
    for layer in methods["pissa"]["layers"].values():
        assert layer["decomposition"]["rank_used"] == 8
        assert layer["alignment"] < 0.9


def test_outputs_and_reference_rows(adapter_runs):
    root, results = adapter_runs
    out = root / "out"
    for name in ("results.json", "results.md", "principal_angles.png", "decomposition.png"):
        assert (out / name).stat().st_size > 0, name
    baseline = results["random_direction_baseline"]["32x32"]
    assert 0.0 < baseline["mean"] < 1.0 and math.isfinite(baseline["p95"])
    assert results["full_finetune_reference"]["layers"]  # intruders of W0 + dW, per layer
    report = (out / "results.md").read_text()
    assert "fraction < threshold" in report and "| spectral_full |" in report
