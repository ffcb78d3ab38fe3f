"""Spectral mathematics in float64: second moments, subspaces, rank selection, Theorem 1."""

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.covariance import OAS, LedoitWolf

from sadlora import (
    SecondMoment,
    data_weighted_subspace,
    error_decomposition,
    optimal_adapter,
    principal_angles,
    select_ranks,
    spectral_gap,
)
from sadlora.spectral import brute_force_rank_allocation, data_weighted_gram, sigma_factor

SETTINGS = settings(max_examples=30, deadline=None)
F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def covariance(seed: int, d: int, condition: float = 1.0) -> torch.Tensor:
    """Rotated covariance with eigenvalues decaying geometrically to 1 / condition."""
    q = torch.linalg.qr(randn(seed, d, d))[0]
    eigenvalues = torch.logspace(0, -np.log10(condition), d, dtype=F64)
    return q @ torch.diag(eigenvalues) @ q.T


def samples(seed: int, n: int, sigma: torch.Tensor) -> torch.Tensor:
    return randn(seed, n, sigma.shape[0]) @ torch.linalg.cholesky(sigma).T


# ---------------------------------------------------------------------------------------------
# SecondMoment
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 6), st.integers(0, 1000))
def test_second_moment_is_split_invariant(n, d, seed):
    x = randn(seed, n, d)
    whole = SecondMoment(d)
    whole.update(x)
    pieces = SecondMoment(d)
    for chunk in torch.split(x, 3):
        pieces.update(chunk)
    torch.testing.assert_close(whole.mean(), x.T @ x / n, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(pieces.mean(), whole.mean(), atol=1e-12, rtol=1e-12)
    assert whole.count == pieces.count == n


def test_second_moment_masks_padding():
    x = randn(0, 3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    moment = SecondMoment(4)
    moment.update(x, mask)
    real = x[mask.bool()]
    assert moment.count == 9
    torch.testing.assert_close(moment.mean(), real.T @ real / 9, atol=1e-14, rtol=1e-12)
    # Garbage in padded positions must not matter.
    poisoned = x.clone()
    poisoned[~mask.bool()] = 1e6
    other = SecondMoment(4)
    other.update(poisoned, mask)
    torch.testing.assert_close(other.mean(), moment.mean(), atol=0, rtol=0)


def test_second_moment_merge_equals_joint_update():
    a, b = randn(1, 7, 3), randn(2, 11, 3)
    left, right, joint = SecondMoment(3), SecondMoment(3), SecondMoment(3)
    left.update(a)
    right.update(b)
    joint.update(torch.cat([a, b]))
    left.merge(right)
    torch.testing.assert_close(left.mean(), joint.mean(), atol=1e-14, rtol=1e-12)
    assert left.count == 18
    for shrinkage in ("ledoit_wolf", "oas"):
        torch.testing.assert_close(left.mean(shrinkage), joint.mean(shrinkage))


@pytest.mark.parametrize("n,d", [(200, 5), (30, 12), (8, 20)])
@pytest.mark.parametrize("name,estimator", [("ledoit_wolf", LedoitWolf), ("oas", OAS)])
def test_shrinkage_equals_scikit_learn(n, d, name, estimator):
    x = samples(3, n, covariance(4, d, condition=50.0)) + 0.3  # non-zero mean: uncentred
    moment = SecondMoment(d)
    for chunk in torch.split(x, 7):
        moment.update(chunk)
    reference = estimator(assume_centered=True).fit(x.numpy())
    np.testing.assert_allclose(moment.mean(name).numpy(), reference.covariance_, rtol=1e-10,
                               atol=1e-12)
    assert moment.shrinkage_intensity(name) == pytest.approx(reference.shrinkage_, rel=1e-10)


def test_second_moment_float32_input_uses_float32_products_float64_sum():
    # The fast path: a float32 batch's product in float32, summed over batches in float64.
    x = randn(5, 6, 50, 16)
    x32 = x.to(torch.float32)
    mask = (torch.arange(50)[None, :] < torch.tensor([50, 40, 30, 20, 10, 3])[:, None]).long()
    fast = SecondMoment(16)
    for batch, batch_mask in zip(torch.split(x32, 2), torch.split(mask, 2)):
        fast.update(batch, batch_mask)
    exact = x32.double()[mask.bool()]
    assert fast.sum.dtype == torch.float64 and fast.count == exact.shape[0]
    torch.testing.assert_close(fast.mean(), exact.T @ exact / exact.shape[0], rtol=1e-5,
                               atol=1e-6)
    for shrinkage in ("ledoit_wolf", "oas"):
        reference = SecondMoment(16)
        reference.update(exact)
        assert fast.shrinkage_intensity(shrinkage) == pytest.approx(
            reference.shrinkage_intensity(shrinkage), rel=1e-4)


def test_second_moment_errors():
    with pytest.raises(ValueError, match="calibration set is empty"):
        SecondMoment(3).mean()
    all_padding = SecondMoment(3)
    all_padding.update(randn(0, 2, 4, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="masked as padding"):
        all_padding.mean()
    with pytest.raises(ValueError, match="got vectors of size 4"):
        SecondMoment(3).update(randn(0, 2, 4))
    with pytest.raises(ValueError, match="unknown shrinkage 'lw'"):
        moment = SecondMoment(2)
        moment.update(randn(0, 4, 2))
        moment.mean("lw")


# ---------------------------------------------------------------------------------------------
# Data-weighted subspace
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(st.integers(2, 10), st.integers(2, 14), st.integers(2, 9), st.integers(0, 1000))
def test_three_routes_agree(d_out, d_in, n, seed):
    delta_w = randn(seed, d_out, d_in)
    x = randn(seed + 1, n, d_in)
    sigma = x.T @ x / n
    gram = sum(torch.outer(delta_w @ v, delta_w @ v) for v in x) / n
    # Beyond rank(K) the directions are arbitrary and the singular values are sqrt(round-off).
    k = min(d_out, d_in, n)
    routes = [
        data_weighted_subspace(delta_w, sigma, k),
        data_weighted_subspace(None, k=k, gram=gram),
        data_weighted_subspace(delta_w, k=k, inputs=x),
        data_weighted_subspace(delta_w, k=k, factor=sigma_factor(sigma)),
    ]
    reference = routes[0]
    values = reference.singular_values
    # Compare only directions separated from their neighbours (tied values rotate freely).
    gaps = torch.cat([values[:-1] - values[1:], values[-1:]])
    separated = torch.minimum(gaps, torch.cat([values[:1], gaps[:-1]])) > 1e-3 * values[0]
    for other in routes[1:]:
        torch.testing.assert_close(other.singular_values, values, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(other.total_energy, reference.total_energy, atol=1e-8,
                                   rtol=1e-10)
        torch.testing.assert_close(other.basis[:, separated], reference.basis[:, separated],
                                   atol=1e-8, rtol=0)


@SETTINGS
@given(st.integers(3, 12), st.integers(1, 6), st.integers(0, 1000), st.booleans())
def test_wide_output_uses_factor_route_equal_to_eigh_of_k(d_in, extra, seed, weighted):
    # d_out > d_in: the SVD of dW F^T (Sigma = F^T F) must match eigh of K = dW Sigma dW^T,
    # also for a singular Sigma (fewer samples than d_in) and for Sigma = I.
    d_out = d_in + extra
    delta_w = randn(seed, d_out, d_in)
    x = randn(seed + 1, max(1, d_in - 1), d_in)
    sigma = x.T @ x / x.shape[0] if weighted else None
    gram = data_weighted_gram(delta_w, sigma)
    result = data_weighted_subspace(delta_w, sigma)
    eigen = data_weighted_subspace(None, gram=gram)
    # squared values: eigh gives sqrt(round-off) ~ 1e-7 where the SVD gives ~1e-16 for 0
    torch.testing.assert_close(result.singular_values.square(), eigen.singular_values.square(),
                               atol=1e-12, rtol=1e-9)
    assert float(result.total_energy) == pytest.approx(float(torch.trace(gram)), rel=1e-12)
    values = result.singular_values
    rank = int((values > 1e-6 * values[0]).sum())
    # span of the leading (nonzero) directions: the projectors agree whatever the ties
    for top in range(1, rank + 1):
        if top < rank and values[top - 1] - values[top] < 1e-3 * values[0]:
            continue
        left, right = result.basis[:, :top], eigen.basis[:, :top]
        torch.testing.assert_close(left @ left.T, right @ right.T, atol=1e-7, rtol=0)


def test_sigma_factor_reproduces_sigma():
    sigma = covariance(3, 7, condition=1e4)
    factor = sigma_factor(sigma)
    torch.testing.assert_close(factor.T @ factor, sigma, atol=1e-12, rtol=1e-12)
    singular = torch.outer(randn(4, 5, 1)[:, 0], randn(4, 5, 1)[:, 0])  # rank one
    torch.testing.assert_close(sigma_factor(singular).T @ sigma_factor(singular), singular,
                               atol=1e-12, rtol=0)


def test_matches_svd_of_weighted_update():
    delta_w, sigma = randn(0, 6, 9), covariance(1, 9, condition=100.0)
    weighted = delta_w.numpy() @ scipy.linalg.sqrtm(sigma.numpy()).real
    u, s, _ = np.linalg.svd(weighted)
    result = data_weighted_subspace(delta_w, sigma, k=4)
    np.testing.assert_allclose(result.singular_values.numpy(), s[:4], rtol=1e-9)
    np.testing.assert_allclose(np.abs(result.basis.numpy().T @ u[:, :4]), np.eye(4), atol=1e-8)
    assert float(result.total_energy) == pytest.approx(float((s**2).sum()), rel=1e-12)
    assert float(result.tail(2)) == pytest.approx(float((s[2:] ** 2).sum()), rel=1e-10)
    # Deterministic signs: the largest-magnitude entry of every column is positive.
    columns = result.basis.T
    assert all(float(c[c.abs().argmax()]) > 0 for c in columns)


def test_identity_sigma_is_plain_svd_and_dtype_kept():
    delta_w = randn(2, 5, 7).float()
    result = data_weighted_subspace(delta_w, k=3)
    assert result.basis.dtype == torch.float32
    s = torch.linalg.svdvals(delta_w.double())
    torch.testing.assert_close(result.singular_values.double(), s[:3], rtol=1e-6, atol=1e-6)


def test_subspace_errors():
    with pytest.raises(ValueError, match=r"k must be in \[1, d_out=4\]"):
        data_weighted_subspace(randn(0, 4, 3), k=5)
    with pytest.raises(ValueError, match="sigma must be the"):
        data_weighted_subspace(randn(0, 4, 3), torch.eye(4, dtype=F64))
    with pytest.raises(ValueError, match=r"factor must be \(n, d_in=3\)"):
        data_weighted_subspace(randn(0, 4, 3), factor=torch.eye(4, dtype=F64))
    with pytest.raises(ValueError, match="at most one of"):
        data_weighted_subspace(randn(0, 4, 3), torch.eye(3, dtype=F64), gram=torch.eye(4))


def test_spectral_gap():
    values = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=F64)
    assert float(spectral_gap(values, 1)) == 2.0
    assert float(spectral_gap(values, 3)) == float("inf")
    assert float(spectral_gap(torch.tensor([2.0, 0.0, 0.0]), 2)) == float("inf")
    with pytest.raises(ValueError, match="rank r=5"):
        spectral_gap(values, 5)


# ---------------------------------------------------------------------------------------------
# Rank selection (Theorem 2)
# ---------------------------------------------------------------------------------------------


def test_threshold_rank_uses_whole_spectrum():
    values = torch.tensor([3.0, 2.0, 1.0], dtype=F64)  # energies 9, 4, 1 of a 14 + 6 total
    ranks = select_ranks({"a": values}, energy_threshold=0.6, total_energy_by_layer={"a": 20.0})
    assert ranks == {"a": 2}  # 13 / 20 >= 0.6 > 9 / 20
    # Without the total the stored top values are taken as the whole spectrum: 9/14 >= 0.6.
    assert select_ranks({"a": values}, energy_threshold=0.6) == {"a": 1}
    assert select_ranks([values], energy_threshold=0.99, max_rank=2) == {"0": 2}
    assert select_ranks([values], energy_threshold=0.1, min_rank=2) == {"0": 2}


@SETTINGS
@given(st.lists(st.integers(2, 6), min_size=2, max_size=4), st.integers(0, 1000), st.data())
def test_threshold_rank_definition(lengths, seed, data):
    spectra = {str(i): randn(seed + i, n).abs().sort(descending=True).values
               for i, n in enumerate(lengths)}
    totals = {name: float(v.square().sum()) * 1.25 for name, v in spectra.items()}
    keep = data.draw(st.floats(0.05, 0.78))  # reachable: the stored top values hold 80%
    ranks = select_ranks(spectra, energy_threshold=keep, total_energy_by_layer=totals, min_rank=1)
    for name, rank in ranks.items():
        tail = totals[name] - float(spectra[name][:rank].square().sum())
        assert tail <= (1 - keep) * totals[name] + 1e-12
        if rank > 1:
            previous_tail = totals[name] - float(spectra[name][: rank - 1].square().sum())
            assert previous_tail > (1 - keep) * totals[name]


@SETTINGS
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(0, 1000), st.data())
def test_greedy_budget_equals_brute_force(lengths, seed, data):
    spectra = [randn(seed + i, n).abs().sort(descending=True).values for i, n in enumerate(lengths)]
    max_rank = 4
    capacity = sum(min(max_rank, len(v)) for v in spectra)
    budget = data.draw(st.integers(len(spectra), capacity))
    greedy = select_ranks(spectra, total_budget=budget, min_rank=1, max_rank=max_rank)
    allocation = tuple(greedy[str(i)] for i in range(len(spectra)))
    best = brute_force_rank_allocation(spectra, budget, 1, max_rank)

    def summed_tail(ranks):
        return sum(float(v[r:].square().sum()) for v, r in zip(spectra, ranks))

    assert sum(allocation) == budget
    assert summed_tail(allocation) == pytest.approx(summed_tail(best), abs=1e-12)


def test_rank_selection_errors():
    values = {"a": torch.ones(3, dtype=F64)}
    with pytest.raises(ValueError, match="total_budget=10 is infeasible"):
        select_ranks(values, total_budget=10)
    with pytest.raises(ValueError, match="energy_threshold"):
        select_ranks(values, energy_threshold=1.5)
    with pytest.raises(ValueError, match="min_rank=4"):
        select_ranks(values, min_rank=4)


# ---------------------------------------------------------------------------------------------
# Exact decomposition (Theorem 1) and the optimal adapter
# ---------------------------------------------------------------------------------------------

SIGMAS = {
    "identity": lambda d: torch.eye(d, dtype=F64),
    "ill_conditioned": lambda d: covariance(7, d, condition=1e6),
}


@pytest.mark.parametrize("sigma_name", sorted(SIGMAS))
@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_decomposition_identity_and_bounds(sigma_name, scale, rank):
    d_out, d_in = 8, 10
    delta_w = randn(0, d_out, d_in)
    sigma = SIGMAS[sigma_name](d_in)
    B, A = scale * randn(1, d_out, rank), scale * randn(2, rank, d_in)  # noqa: N806
    parts = error_decomposition(delta_w, sigma, B, A, scaling=0.5)
    summed = parts["misalignment"] + parts["coefficient"] + parts["rank_residual"]
    assert abs(float(parts["total"] - summed)) <= 1e-10 * float(parts["total"])
    tolerance = 1e-10 * float(parts["total_energy"])
    assert float(parts["misalignment"]) >= -tolerance
    assert float(parts["coefficient"]) >= -tolerance
    assert float(parts["lower_bound"]) <= float(parts["misalignment"]) + tolerance
    assert float(parts["misalignment"]) <= float(parts["upper_bound"]) + tolerance
    # Independent check of the total: the Frobenius norm of the weighted residual.
    root = torch.from_numpy(scipy.linalg.sqrtm(sigma.numpy()).real)
    direct = ((delta_w - 0.5 * B @ A) @ root).square().sum()
    assert float(parts["total"]) == pytest.approx(float(direct), rel=1e-8)
    # T_II = ||P W~ - M Sigma^{1/2}||_F^2.
    projector = B @ torch.linalg.solve(B.T @ B, B.T)
    t2 = (projector @ delta_w @ root - 0.5 * B @ A @ root).square().sum()
    assert float(parts["coefficient"]) == pytest.approx(float(t2), rel=1e-7, abs=tolerance)


def test_total_is_monte_carlo_mean_over_calibration_samples():
    d_out, d_in, n = 5, 7, 300
    delta_w, x = randn(0, d_out, d_in), samples(1, n, covariance(2, d_in, 30.0))
    B, A = randn(3, d_out, 2), randn(4, 2, d_in)  # noqa: N806
    moment = SecondMoment(d_in)
    moment.update(x)
    parts = error_decomposition(delta_w, moment.mean(), B, A, scaling=2.0)
    monte_carlo = ((delta_w - 2.0 * B @ A) @ x.T).square().sum(0).mean()
    assert float(parts["total"]) == pytest.approx(float(monte_carlo), rel=1e-12)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_optimal_adapter_reaches_the_tail(rank):
    delta_w, sigma = randn(5, 6, 9), covariance(6, 9, 100.0)
    B, A = optimal_adapter(delta_w, sigma, rank, scaling=2.0)  # noqa: N806
    parts = error_decomposition(delta_w, sigma, B, A, scaling=2.0)
    subspace = data_weighted_subspace(delta_w, sigma)
    tail = float(subspace.tail(rank))
    assert float(parts["total"]) == pytest.approx(tail, rel=1e-9)
    scale = float(subspace.total_energy)
    assert abs(float(parts["misalignment"])) < 1e-10 * scale
    assert abs(float(parts["coefficient"])) < 1e-10 * scale
    assert float(parts["alignment_loss"]) < 1e-12
    # Any other rank-r adapter does no better (data-weighted Eckart-Young).
    for seed in range(5):
        other = error_decomposition(delta_w, sigma, randn(seed, 6, rank), randn(seed + 9, rank, 9))
        assert float(other["total"]) >= tail


def test_aligned_subspace_has_zero_misalignment_with_any_coefficients():
    delta_w, sigma = randn(8, 6, 5), covariance(9, 5, 10.0)
    basis = data_weighted_subspace(delta_w, sigma, k=3).basis
    mixed = basis @ randn(10, 3, 3)  # same column space, another basis
    parts = error_decomposition(delta_w, sigma, mixed, randn(11, 3, 5))
    assert abs(float(parts["misalignment"])) < 1e-10 * float(parts["total_energy"])
    angles = principal_angles(mixed, basis)
    assert float(angles.max()) < 1e-7


def test_decomposition_shape_error():
    with pytest.raises(ValueError, match="do not fit"):
        error_decomposition(randn(0, 4, 3), None, randn(0, 4, 2), randn(0, 3, 3))
