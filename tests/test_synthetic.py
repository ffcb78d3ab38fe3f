"""The synthetic spectral validation experiment: a quick run end to end, its claims, its CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sadlora.experiments.synthetic import SyntheticConfig, effective_config, run_synthetic
from sadlora.experiments.synthetic_layer import (
    gap_spectrum,
    initial_adapter,
    make_problem,
    train_adapters,
)

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    results = run_synthetic(SyntheticConfig(quick=True, output_dir=str(out)))
    return out, results


def test_writes_json_markdown_and_figures(quick):
    out, results = quick
    saved = json.loads((out / "results.json").read_text())
    assert saved["wall_time_s"] > 0
    assert set(saved) >= {"config", "part1", "part2", "part3", "part4", "figures"}
    text = (out / "results.md").read_text()
    for heading in ("## 1.", "## 2.", "## 3.", "## 4."):
        assert heading in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["part1_decomposition.png", "part3_convergence.png", "part4_grid.png"]
    assert all((out / name).stat().st_size > 1000 for name in pngs)


def test_theorem1_identity_bounds_and_monte_carlo(quick):
    part1 = quick[1]["part1"]
    assert len(part1["rows"]) == 3 * 2 * 2  # spectra x quick covariances x quick scales
    assert part1["max_identity_residual"] < 1e-10
    assert all(row["identity_residual"] < 1e-10 for row in part1["rows"])
    assert all(row["bounds_hold"] for row in part1["rows"])
    # total is tr((dW - M) Sigma_hat (dW - M)^T): the sample mean over the calibration set.
    assert part1["max_mc_relative_difference"] < 1e-10
    flat = [row for row in part1["rows"] if row["spectrum"] == "flat"]
    assert all(abs(row["T_I"]) < 1e-12 for row in flat)  # any subspace is optimal without a gap


def test_theorem2_rank_definition_and_trained_errors(quick):
    rows = quick[1]["part2"]["rows"]
    assert quick[1]["part2"]["all_definitions_hold"]
    for row in rows:
        eps, r_star = row["eps"], row["r_star"]
        assert row["tail_r_star"] <= eps + 1e-12
        assert r_star == 1 or row["tail_r_star_minus_1"] > eps
        assert row["optimal_adapter_error"] == pytest.approx(row["tail_r_star"], abs=1e-12)
        # Data-weighted Eckart-Young: no trained rank-r adapter beats tail(r).
        assert row["trained_r_star"] >= row["tail_r_star"] - 1e-12
        assert row["trained_r_star_minus_1"] >= row["tail_r_star_minus_1"] - 1e-12
        assert row["trained_r_star_minus_1"] > eps  # so r* - 1 cannot meet the threshold


def _part3(results, gap, method):
    return {r["covariance"]: r for r in results["part3"]["rows"]
            if r["gap"] == gap and r["method"] == method}


def test_alignment_reaches_optimum_no_later_with_a_sharp_gap(quick):
    # Measured on 12 seeds of the quick config: with gamma = 10, whenever KD got within delta
    # of tail(r), both SAD variants got there in no more steps (and faster with Sigma = I).
    results = quick[1]
    gap = max(results["config"]["gaps"])
    kd = _part3(results, gap, "kd")
    for method in ("sad_projection", "sad_energy"):
        sad = _part3(results, gap, method)
        for cov, row in kd.items():
            if row["steps_to_delta"] is not None:
                assert sad[cov]["steps_to_delta"] is not None
                assert sad[cov]["steps_to_delta"] <= row["steps_to_delta"]
        assert sad["identity"]["steps_to_delta"] < kd["identity"]["steps_to_delta"]


def test_flat_spectrum_projection_loss_is_not_the_error(quick):
    # gamma = 1: every subspace of the support is optimal, so KD ends with T_I ~ 0 while its
    # projection misalignment to the arbitrary basis U_r stays far from 0.
    kd = _part3(quick[1], 1.0, "kd")
    assert all(abs(row["T_I"]) < 1e-6 for row in kd.values())
    assert max(row["alignment_final"] for row in kd.values()) > 0.2


def test_grid_rows_decompose(quick):
    results = quick[1]
    rows = results["part4"]["rows"]
    cfg = results["config"]
    assert len(rows) == (len(cfg["grid_ranks"]) * len(cfg["grid_methods"])
                         * len(cfg["spectra"]) * len(cfg["covariances"]))
    for row in rows:
        assert row["T_I"] + row["T_II"] + row["T_III"] == pytest.approx(row["total"], rel=1e-10)
        assert row["excess"] == pytest.approx(row["total"] - row["T_III"], abs=1e-10)


def test_problem_has_the_designed_data_weighted_spectrum():
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=F64))[0]
    sigma = q @ torch.diag(torch.logspace(0, -2, 12, dtype=F64)) @ q.T
    values = gap_spectrum(8, rank=2, gap=3.0, support=5)
    problem = make_problem(values, sigma, 8, g)
    assert float(problem.subspace.total_energy) == pytest.approx(1.0, abs=1e-12)
    expected = values / values.norm()
    # Compare squares: the zero values come from sqrt(eigh round-off) ~ 1e-9.
    assert torch.allclose(problem.subspace.singular_values.square(), expected.square(),
                          atol=1e-12)
    assert float(problem.subspace.singular_values[1] / problem.subspace.singular_values[2]) == \
        pytest.approx(3.0)


def test_stacked_training_equals_separate_runs():
    cfg = effective_config(SyntheticConfig(quick=True, steps=15))
    g = torch.Generator().manual_seed(1)
    problem = make_problem(gap_spectrum(16, 2, 3.0, 4), torch.eye(24, dtype=F64), 16, g)
    init = initial_adapter(problem, 2, cfg, torch.Generator().manual_seed(2))

    def run(methods):
        return train_adapters(problem, init, methods, cfg, optimizer="sgd", lr=0.3, steps=15,
                              data_seed=torch.Generator().manual_seed(3))

    stacked = run(["kd", "sad_projection", "sad_energy"])
    for together in stacked:
        (alone,) = run([together["method"]])
        assert torch.allclose(together["B"], alone["B"], atol=1e-12)
        assert torch.allclose(together["A"], alone["A"], atol=1e-12)


def test_bad_config_names_the_valid_choices():
    with pytest.raises(ValueError, match="sharp"):
        effective_config(SyntheticConfig(spectra=["steep"]))
    with pytest.raises(ValueError, match="d_in"):
        effective_config(SyntheticConfig(d_out=100, d_in=96))


def test_cli_runs_and_is_reproducible(quick, tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "run_synthetic.py"),
         "--config", str(ROOT / "configs" / "exp_synthetic.yaml"), "quick=true",
         f"output_dir={out}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((out / "results.json").read_text())
    reference = json.loads((quick[0] / "results.json").read_text())
    # The YAML holds the defaults, so the same seed must give the same numbers.
    for part in ("part1", "part2", "part3", "part4"):
        assert saved[part] == reference[part]
