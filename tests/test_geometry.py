"""Principal angles and subspace distances against scipy, and their invariances (float64)."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sadlora import alignment_score, principal_angles, subspace_distance
from sadlora.geometry import SUBSPACE_DISTANCES, max_distance

SETTINGS = settings(max_examples=40, deadline=None)


def random_matrix(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def orthonormal(seed: int, d: int, r: int) -> torch.Tensor:
    return torch.linalg.qr(random_matrix(seed, d, r))[0]


dims = st.tuples(st.integers(2, 12), st.integers(1, 5), st.integers(1, 5)).filter(
    lambda t: max(t[1], t[2]) <= t[0]
)


@SETTINGS
@given(dims.filter(lambda t: t[1] + t[2] <= t[0]), st.integers(0, 10_000))
def test_agrees_with_scipy(shape, seed):
    # r1 + r2 <= d: generic subspaces do not intersect. When they must intersect (r1 + r2 > d)
    # the true smallest angle is 0 and scipy returns ~1.5e-8 (sqrt of machine epsilon), see
    # test_forced_intersection_is_exactly_zero.
    d, r1, r2 = shape
    first, second = random_matrix(seed, d, r1), random_matrix(seed + 1, d, r2)
    ours = principal_angles(first, second).numpy()
    reference = np.sort(scipy.linalg.subspace_angles(first.numpy(), second.numpy()))
    np.testing.assert_allclose(ours, reference, atol=1e-10, rtol=0)
    assert np.all(np.diff(ours) >= -1e-15), "angles must be ascending"
    assert np.all((ours >= 0) & (ours <= math.pi / 2 + 1e-15))


def test_forced_intersection_is_exactly_zero():
    # Two 4-dimensional subspaces of R^7 share at least one direction.
    first, second = random_matrix(1, 7, 4), random_matrix(2, 7, 4)
    assert float(principal_angles(first, second)[0]) < 1e-14


@pytest.mark.parametrize("angle", [1e-8, 1e-6, 1e-4, 1e-2, 0.3, 0.7, 1.2, math.pi / 2 - 1e-6])
def test_tiny_and_large_angles_accurate(angle):
    # Two planes in R^6 at exactly known angles (angle, angle/2); arccos of the cosines alone
    # would return 0 for angles below ~1e-8.
    d = 6
    q = orthonormal(0, d, d)
    first = q[:, :2]
    rotated = torch.stack(
        [
            math.cos(angle) * q[:, 0] + math.sin(angle) * q[:, 2],
            math.cos(angle / 2) * q[:, 1] + math.sin(angle / 2) * q[:, 3],
        ],
        dim=1,
    )
    mixed = rotated @ random_matrix(3, 2, 2)  # non-orthonormal basis of the same plane
    ours = principal_angles(first, mixed).numpy()
    expected = np.array([angle / 2, angle])
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-15)
    reference = np.sort(scipy.linalg.subspace_angles(first.numpy(), mixed.numpy()))
    np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=1e-15)


@SETTINGS
@given(dims, st.integers(0, 10_000))
def test_invariant_to_change_of_basis_and_symmetric(shape, seed):
    d, r1, r2 = shape
    first, second = random_matrix(seed, d, r1), random_matrix(seed + 1, d, r2)
    mix = random_matrix(seed + 2, r1, r1) + 3 * torch.eye(r1, dtype=torch.float64)
    base = principal_angles(first, second)
    torch.testing.assert_close(principal_angles(first @ mix, second), base, atol=1e-9, rtol=0)
    torch.testing.assert_close(principal_angles(second, first), base, atol=1e-12, rtol=0)


def test_batched_matches_loop():
    first, second = random_matrix(0, 4, 10, 3), random_matrix(1, 4, 10, 3)
    batched = principal_angles(first, second)
    for i in range(4):
        torch.testing.assert_close(batched[i], principal_angles(first[i], second[i]))


def test_identical_and_orthogonal_subspaces():
    q = orthonormal(5, 8, 4)
    torch.testing.assert_close(principal_angles(q[:, :2], q[:, :2] * 7), torch.zeros(2,
                               dtype=torch.float64), atol=1e-14, rtol=0)
    orth = principal_angles(q[:, :2], q[:, 2:])
    torch.testing.assert_close(orth, torch.full((2,), math.pi / 2, dtype=torch.float64))
    assert float(alignment_score(q[:, :2], q[:, 2:])) == pytest.approx(0.0, abs=1e-14)
    assert float(alignment_score(q[:, :2], q[:, :3])) == pytest.approx(1.0, abs=1e-14)


@SETTINGS
@given(dims, st.integers(0, 10_000))
def test_scores_and_distances_from_angles(shape, seed):
    d, r1, r2 = shape
    first, second = random_matrix(seed, d, r1), random_matrix(seed + 1, d, r2)
    theta = principal_angles(first, second)
    k = theta.shape[-1]
    score = alignment_score(first, second)
    torch.testing.assert_close(score, torch.cos(theta).square().mean(), atol=1e-12, rtol=0)
    expected = {
        "projection": torch.sin(theta).norm(),
        "geodesic": theta.norm(),
        "binet_cauchy": (1 - torch.cos(theta).square().prod()).clamp_min(0).sqrt(),
    }
    for kind, value in expected.items():
        distance = subspace_distance(first, second, kind)
        torch.testing.assert_close(distance, value, atol=1e-12, rtol=0)
        assert 0.0 <= float(distance) <= max_distance(kind, k) + 1e-12


def test_projection_distance_is_projector_difference():
    first, second = random_matrix(0, 9, 3), random_matrix(1, 9, 3)
    q1, q2 = torch.linalg.qr(first)[0], torch.linalg.qr(second)[0]
    frob = (q1 @ q1.T - q2 @ q2.T).norm() / math.sqrt(2)
    torch.testing.assert_close(subspace_distance(first, second, "projection"), frob)


def test_float32_supported():
    first, second = random_matrix(0, 16, 4).float(), random_matrix(1, 16, 4).float()
    angles = principal_angles(first, second)
    assert angles.dtype == torch.float32
    torch.testing.assert_close(angles.double(), principal_angles(first.double(),
                               second.double()), atol=1e-5, rtol=0)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="same ambient space"):
        principal_angles(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="unknown subspace distance 'cosine'"):
        subspace_distance(torch.randn(5, 2), torch.randn(5, 2), "cosine")
    with pytest.raises(ValueError, match=r"\(\.\.\., d, r\)"):
        principal_angles(torch.randn(5), torch.randn(5, 1))
    assert set(SUBSPACE_DISTANCES) == {"projection", "geodesic", "binet_cauchy"}
