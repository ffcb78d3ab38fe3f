"""Tests of sadlora.losses: float64 oracles from geometry/spectral, gradcheck, schedule, buffers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sadlora.geometry import principal_angles
from sadlora.losses import (
    AlignmentTargets,
    SADLoss,
    alignment_loss,
    coefficient_loss,
    kd_loss,
    task_loss,
)
from sadlora.spectral import data_weighted_subspace, error_decomposition, optimal_adapter
from sadlora.targets import LayerTarget

F64 = torch.float64
PROPERTY = settings(max_examples=30, deadline=None)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=_gen(seed))


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(_randn(d, k, seed=seed))[0]


def _spd(d: int, seed: int) -> torch.Tensor:
    x = _randn(d, 2 * d, seed=seed)
    return x @ x.T / (2 * d) + 0.1 * torch.eye(d, dtype=F64)


def _well_conditioned(d_out: int, r: int, seed: int) -> torch.Tensor:
    b = _randn(d_out, r, seed=seed)
    assume(torch.linalg.cond(b) < 30)
    return b


def _problem(d_out: int, d_in: int, seed: int):
    """A teacher update dW, an SPD Sigma and its full data-weighted subspace (k = d_out)."""
    delta_w, sigma = _randn(d_out, d_in, seed=seed), _spd(d_in, seed + 1)
    return delta_w, sigma, data_weighted_subspace(delta_w, sigma)


def _target(d_out: int, d_in: int, k: int, rank: int, seed: int, sigma: bool = True,
            dtype: torch.dtype = F64) -> LayerTarget:
    delta_w, spd, _ = _problem(d_out, d_in, seed)
    sub = data_weighted_subspace(delta_w, spd, k=k)
    return LayerTarget(basis=sub.basis.to(dtype), singular_values=sub.singular_values.to(dtype),
                       total_energy=sub.total_energy.to(dtype), rank=rank, gap=2.0,
                       sigma=spd.to(dtype) if sigma else None)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


# --------------------------------------------------------------------------------------------
# Alignment losses
# --------------------------------------------------------------------------------------------

dims = st.integers(min_value=2, max_value=9)


@PROPERTY
@given(d_out=dims, data=st.data(), seed=st.integers(0, 10_000))
def test_projection_loss_is_mean_squared_sine_of_principal_angles(d_out, data, seed):
    r = data.draw(st.integers(1, d_out))
    k = data.draw(st.integers(r, d_out))
    b = _well_conditioned(d_out, r, seed)
    basis = _orthonormal(d_out, k, seed + 1)
    expected = torch.sin(principal_angles(b, basis[:, :r])).square().mean()
    assert alignment_loss(b, basis) == pytest.approx(float(expected), abs=1e-10)


@PROPERTY
@given(d_out=st.integers(3, 9), data=st.data(), seed=st.integers(0, 10_000))
def test_energy_loss_is_normalised_misalignment_of_theorem_1(d_out, data, seed):
    r = data.draw(st.integers(1, d_out - 1))
    d_in = data.draw(st.integers(2, 9))
    delta_w, sigma, sub = _problem(d_out, d_in, seed)
    b, a = _well_conditioned(d_out, r, seed + 2), _randn(r, d_in, seed=seed + 3)
    misalignment = error_decomposition(delta_w, sigma, b, a)["misalignment"]
    expected = misalignment / sub.singular_values[:r].square().sum()
    loss = alignment_loss(b, sub.basis, kind="energy", singular_values=sub.singular_values)
    assert loss == pytest.approx(float(expected), abs=1e-10)
    assert -1e-12 <= float(loss) <= 1 + 1e-12


def test_losses_batch_over_leading_dimensions():
    b = _randn(2, 3, 7, 2, seed=0)
    basis = torch.stack([torch.stack([_orthonormal(7, 4, 10 * i + j) for j in range(3)])
                         for i in range(2)])
    values = torch.rand(2, 3, 4, dtype=F64, generator=_gen(1)).sort(-1, descending=True).values
    for kind in ("projection", "energy"):
        batched = alignment_loss(b, basis, kind=kind, singular_values=values)
        assert batched.shape == (2, 3)
        single = alignment_loss(b[1, 2], basis[1, 2], kind=kind, singular_values=values[1, 2])
        assert batched[1, 2] == pytest.approx(float(single), abs=1e-14)


@PROPERTY
@given(d_out=st.integers(3, 9), data=st.data(), seed=st.integers(0, 10_000))
def test_alignment_losses_invariant_to_change_of_basis_of_b(d_out, data, seed):
    r = data.draw(st.integers(1, d_out - 1))
    b = _well_conditioned(d_out, r, seed)
    mix = _randn(r, r, seed=seed + 1)
    assume(torch.linalg.cond(mix) < 30)
    basis = _orthonormal(d_out, d_out, seed + 2)
    values = torch.linspace(3.0, 0.5, d_out, dtype=F64)
    for kind in ("projection", "energy"):
        before = alignment_loss(b, basis, kind=kind, singular_values=values)
        after = alignment_loss(b @ mix, basis, kind=kind, singular_values=values)
        assert after == pytest.approx(float(before), abs=1e-9)


def test_projection_loss_zero_on_target_and_one_when_orthogonal():
    basis = _orthonormal(8, 8, 0)
    assert alignment_loss(basis[:, :3] @ _randn(3, 3, seed=1), basis) == pytest.approx(0, abs=1e-10)
    assert alignment_loss(basis[:, 4:7], basis) == pytest.approx(1, abs=1e-12)


def test_gradcheck_projection_and_energy():
    basis = _orthonormal(6, 5, 0)
    values = torch.tensor([3.0, 2.0, 1.5, 0.7, 0.2], dtype=F64)
    b = _leaf(_randn(6, 3, seed=1))
    for kind in ("projection", "energy"):
        assert torch.autograd.gradcheck(
            lambda x, kind=kind: alignment_loss(x, basis, kind=kind, singular_values=values), (b,))


def test_rank_deficient_and_zero_b_stay_finite():
    basis = _orthonormal(6, 6, 0)
    values = torch.linspace(2.0, 0.1, 6, dtype=F64)
    column = _randn(6, 1, seed=1)
    deficient = (torch.cat([column, column, 2 * column], 1), torch.zeros(6, 3, dtype=F64))
    for b, dtype, kind in itertools.product(deficient, (F64, torch.float32),
                                            ("projection", "energy")):
        leaf = _leaf(b.to(dtype))
        loss = alignment_loss(leaf, basis.to(dtype), kind=kind, singular_values=values.to(dtype))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()
        assert -1e-6 <= float(loss) <= 1 + 1e-6
    zero = _leaf(torch.zeros(6, 3, dtype=F64))
    loss = alignment_loss(zero, basis)
    loss.backward()
    assert float(loss) == 1.0 and float(zero.grad.abs().max()) == 0.0


def test_alignment_loss_errors_name_the_problem():
    with pytest.raises(ValueError, match="projection"):
        alignment_loss(_randn(5, 2, seed=0), _orthonormal(5, 3, 1), kind="cosine")
    with pytest.raises(ValueError, match="k >= r"):
        alignment_loss(_randn(5, 4, seed=0), _orthonormal(5, 3, 1))
    with pytest.raises(ValueError, match="singular_values"):
        alignment_loss(_randn(5, 2, seed=0), _orthonormal(5, 3, 1), kind="energy")


# --------------------------------------------------------------------------------------------
# Coefficient loss
# --------------------------------------------------------------------------------------------


def _sqrtm(spd: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(spd)
    return vectors @ torch.diag(values.sqrt()) @ vectors.T


@PROPERTY
@given(d_out=st.integers(2, 8), d_in=st.integers(2, 8), data=st.data(),
       seed=st.integers(0, 10_000), scaling=st.sampled_from([0.5, 1.0, 2.0]))
def test_coefficient_loss_matches_svd_oracle_and_vanishes_at_optimum(d_out, d_in, data, seed,
                                                                    scaling):
    r = data.draw(st.integers(1, min(d_out, d_in)))
    delta_w, sigma, sub = _problem(d_out, d_in, seed)
    b, a = _randn(d_out, r, seed=seed + 2), _randn(r, d_in, seed=seed + 3)
    adapter = torch.linalg.svdvals(scaling * b @ a @ _sqrtm(sigma))[:r]
    target = sub.singular_values[:r]
    expected = (adapter - target).square().sum() / target.square().sum()
    loss = coefficient_loss(b, a, sigma, sub.singular_values, scaling=scaling)
    assert loss == pytest.approx(float(expected), rel=1e-7, abs=1e-10)
    b_opt, a_opt = optimal_adapter(delta_w, sigma, r, scaling)
    optimum = coefficient_loss(b_opt, a_opt, sigma, sub.singular_values, scaling=scaling)
    assert abs(float(optimum)) < 1e-8


def test_gradcheck_coefficient_loss():
    sigma = _spd(5, 0)
    values = torch.tensor([4.0, 2.5, 1.0, 0.3], dtype=F64)
    args = (_leaf(_randn(6, 3, seed=1)), _leaf(_randn(3, 5, seed=2)), _leaf(sigma))
    assert torch.autograd.gradcheck(
        lambda b, a, s: coefficient_loss(b, a, s, values, scaling=1.5), args)


@pytest.mark.parametrize("start", ["random_b", "spectral_init", "zero_b"])
def test_coefficient_loss_gradient_finite_at_zero_a(start):
    _, sigma, sub = _problem(7, 5, 3)
    b = {"random_b": _randn(7, 3, seed=4), "spectral_init": sub.basis[:, :3],
         "zero_b": torch.zeros(7, 3, dtype=F64)}[start]
    b, a = _leaf(b), _leaf(torch.zeros(3, 5, dtype=F64))
    loss = coefficient_loss(b, a, sigma, sub.singular_values)
    loss.backward()
    assert float(loss) == pytest.approx(1.0, abs=1e-6)  # sigma^ = 0: the whole target energy
    assert torch.isfinite(b.grad).all() and torch.isfinite(a.grad).all()
    # Just off A = 0 the gradient is finite and pushes sigma^ up toward the target.
    a_small = _leaf(1e-3 * _randn(3, 5, seed=5))
    coefficient_loss(sub.basis[:, :3], a_small, sigma, sub.singular_values).backward()
    assert torch.isfinite(a_small.grad).all()
    assert float((a_small.grad * a_small).sum()) < 0


# --------------------------------------------------------------------------------------------
# KD and task losses
# --------------------------------------------------------------------------------------------


def test_kd_kl_matches_manual_computation():
    student, teacher = _randn(4, 5, seed=0), _randn(4, 5, seed=1)
    t = 3.0
    p = torch.softmax(teacher / t, -1)
    manual = t**2 * (p * (p.log() - torch.log_softmax(student / t, -1))).sum(-1).mean()
    assert kd_loss(student, teacher, temperature=t) == pytest.approx(float(manual), abs=1e-12)
    assert kd_loss(teacher, teacher) == pytest.approx(0.0, abs=1e-12)
    mse = kd_loss(student, teacher, kind="mse")
    assert mse == pytest.approx(float(F.mse_loss(student, teacher)), abs=1e-12)


def test_kd_token_level_averages_over_mask_only():
    student, teacher = _randn(2, 6, 11, seed=0), _randn(2, 6, 11, seed=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    for kind in ("kl", "mse"):
        loss = kd_loss(student, teacher, kind=kind, mask=mask)
        keep = mask.bool()
        expected = kd_loss(student[keep], teacher[keep], kind=kind)
        assert loss == pytest.approx(float(expected), abs=1e-12)
        noisy_s, noisy_t = student.clone(), teacher.clone()
        noisy_s[~keep], noisy_t[~keep] = 1e4, float("nan")
        assert kd_loss(noisy_s, noisy_t, kind=kind, mask=mask) == pytest.approx(float(loss),
                                                                                abs=1e-12)
    assert float(kd_loss(student, teacher, mask=torch.zeros(2, 6))) == 0.0


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(0, 1000))
def test_kd_top_k_is_kl_to_the_renormalised_teacher_top_k(top_k, seed):
    student, teacher = _randn(3, 4, 12, seed=seed), _randn(3, 4, 12, seed=seed + 1)
    t = 2.0
    loss = kd_loss(student, teacher, temperature=t, top_k=top_k)
    # oracle: an explicit sum over the teacher's k best tokens of every position
    log_q = torch.log_softmax(student / t, -1)
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for i, j in itertools.product(range(3), range(4)):
        best = sorted(range(12), key=lambda v: -float(teacher[i, j, v]))[:top_k]
        p = torch.softmax(teacher[i, j, best] / t, -1)
        expected[i, j] = t**2 * (p * (p.log() - log_q[i, j, best])).sum()
    assert float(loss) == pytest.approx(float(expected.mean()), abs=1e-12)
    assert float(loss) >= 0.0  # Gibbs: the student's mass outside the k tokens only adds
    if top_k == 12:
        assert float(loss) == pytest.approx(float(kd_loss(student, teacher, temperature=t)),
                                            abs=1e-12)


def test_kd_top_k_is_zero_when_the_student_keeps_only_the_teacher_top_k():
    teacher = _randn(5, 9, seed=3)
    kept = teacher.topk(3, dim=-1).indices
    student = torch.full_like(teacher, -float("inf")).scatter(-1, kept, teacher.gather(-1, kept))
    assert float(kd_loss(student, teacher, top_k=3)) == pytest.approx(0.0, abs=1e-12)
    assert float(kd_loss(teacher, teacher, top_k=3)) > 1e-3  # full softmax leaks mass outside
    student = teacher.clone().requires_grad_(True)
    kd_loss(student, teacher, top_k=3).backward()
    assert torch.isfinite(student.grad).all()
    with pytest.raises(ValueError, match="top_k=2"):
        kd_loss(student, teacher, kind="mse", top_k=2)
    with pytest.raises(ValueError, match="kd_top_k=0"):
        SADLoss(alpha=0.0, kd_top_k=0)


def test_kd_regression_head_uses_mse_and_errors():
    student, teacher = _randn(8, 1, seed=0), _randn(8, 1, seed=1)
    assert kd_loss(student, teacher) == pytest.approx(float(F.mse_loss(student, teacher)))
    with pytest.raises(ValueError, match="kl"):
        kd_loss(student, teacher, kind="cosine")
    with pytest.raises(ValueError, match="shape"):
        kd_loss(_randn(2, 5, seed=0), _randn(2, 6, seed=0))


def test_task_losses_follow_transformers_conventions():
    logits = _randn(2, 5, 7, seed=0)
    labels = torch.randint(0, 7, (2, 5), generator=_gen(1))
    labels[0, 3:] = -100
    shifted = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1),
                              ignore_index=-100)
    causal = task_loss(logits, labels, problem_type="causal_lm")
    assert causal == pytest.approx(float(shifted), abs=1e-12)
    cls_logits, cls_labels = _randn(4, 3, seed=2), torch.tensor([0, 2, 1, 2])
    assert task_loss(cls_logits, cls_labels, problem_type="single_label_classification") == \
        pytest.approx(float(F.cross_entropy(cls_logits, cls_labels)))
    reg, target = _randn(4, 1, seed=3), _randn(4, seed=4)
    assert task_loss(reg, target, problem_type="regression") == \
        pytest.approx(float(F.mse_loss(reg[:, 0], target)))
    with pytest.raises(ValueError, match="causal_lm"):
        task_loss(reg, target, problem_type="ranking")


# --------------------------------------------------------------------------------------------
# AlignmentTargets and SADLoss
# --------------------------------------------------------------------------------------------


def _targets(rank: int = 2, sigma: bool = True, dtype: torch.dtype = F64) -> AlignmentTargets:
    shapes = {"l0.q": (8, 6, 4), "l0.o": (6, 8, 3), "l1.q": (8, 6, 4)}
    layers = {name: _target(*shape, rank, seed, sigma, dtype)
              for seed, (name, shape) in enumerate(shapes.items())}
    return AlignmentTargets(layers, rank)


def _adapters(targets: AlignmentTargets, seed: int = 0) -> dict:
    d = {"l0.q": (8, 6), "l0.o": (6, 8), "l1.q": (8, 6)}
    r = targets.groups[0].rank
    return {n: (_randn(d[n][0], r, seed=seed + i), _randn(r, d[n][1], seed=seed + 10 + i))
            for i, n in enumerate(targets.layer_names)}


def test_alignment_targets_group_and_hold_buffers():
    targets = _targets(dtype=torch.float32)
    assert [g.names for g in targets.groups] == [("l0.q", "l1.q"), ("l0.o",)]
    assert targets.basis(targets.groups[0]).shape == (2, 8, 4)
    assert list(targets.parameters()) == []
    keys = set(targets.state_dict())
    assert {"group_0_basis", "group_0_singular_values", "group_0_sigma", "group_1_basis"} <= keys
    targets.to(F64)
    assert all(buffer.dtype == F64 for buffer in targets.buffers())
    stacked = targets.stack(_adapters(targets))
    assert stacked[0][0].shape == (2, 8, 2) and stacked[0][1].shape == (2, 2, 6)
    without = _targets(sigma=False)
    assert "group_0_sigma" not in without.state_dict() and without.sigma(without.groups[0]) is None


def test_alignment_targets_errors_name_the_layer():
    with pytest.raises(ValueError, match="l0.o"):
        AlignmentTargets({"l0.o": _target(6, 8, 3, 4, 1)}, rank=4)
    targets = _targets()
    adapters = _adapters(targets)
    with pytest.raises(ValueError, match="l9.v"):
        targets.stack({**adapters, "l9.v": adapters["l0.q"]})
    with pytest.raises(ValueError, match="l0.o"):
        targets.stack({k: v for k, v in adapters.items() if k != "l0.o"})
    with pytest.raises(ValueError, match="l1.q"):
        targets.stack({**adapters, "l1.q": (_randn(8, 3, seed=0), _randn(3, 6, seed=0))})


def _tilted_adapters(targets: AlignmentTargets, angle: float) -> dict:
    """B_i = cos(angle) U_r + sin(angle) (next r directions): every principal angle = angle."""
    adapters = {}
    for group in targets.groups:
        basis = targets.basis(group).to(F64)
        for i, name in enumerate(group.names):
            r, u_r = group.rank, basis[i, :, :group.rank]
            # QR of [U_r, random]: columns r..2r-1 are orthonormal and orthogonal to U_r.
            full = torch.linalg.qr(torch.cat([u_r, _randn(group.d_out, r, seed=7)], 1))[0]
            b = math.cos(angle) * u_r + math.sin(angle) * full[:, r:]
            adapters[name] = (b, torch.zeros(r, targets.sigma(group).shape[-1], dtype=F64))
    return adapters


@pytest.mark.parametrize("schedule", ["adaptive", "fixed"])
def test_schedule_alpha_beta_at_given_misalignment(schedule):
    targets = _targets()
    loss = SADLoss(targets, alpha=2.0, beta=0.5, schedule=schedule, warmup_steps=10,
                   kd_weight=0.0, task_weight=0.0)
    angle = 0.4
    adapters = _tilted_adapters(targets, angle)
    misalignment = math.sin(angle) ** 2
    # Per-layer 1 - r/d_out: 1 - 2/8 for the two q layers, 1 - 2/6 for l0.o.
    progress = (2 * misalignment / 0.75 + misalignment / (1 - 2 / 6)) / 3
    expected = (2.0 * progress, 0.5 * (1 - progress)) if schedule == "adaptive" else (2.0, 0.5)
    logits = _randn(2, 3, seed=0)
    after = loss(adapters, student_logits=logits, problem_type="single_label_classification",
                 step=10)
    assert after["align"] == pytest.approx(misalignment, abs=1e-9)
    assert after["alignment"] == pytest.approx(1 - misalignment, abs=1e-9)
    assert after["alpha_t"] == pytest.approx(expected[0], abs=1e-9)
    assert after["beta_t"] == pytest.approx(expected[1], abs=1e-9)
    during = loss(adapters, student_logits=logits, problem_type="single_label_classification",
                  step=9)
    assert float(during["beta_t"]) == 0.0 and float(during["coeff"]) == 0.0
    assert during["alpha_t"] == pytest.approx(expected[0], abs=1e-9)
    far = loss(_tilted_adapters(targets, math.pi / 2), student_logits=logits,
               problem_type="single_label_classification", step=10)
    if schedule == "adaptive":  # misalignment 1 > 1 - r/d_out: progress clipped to 1
        assert float(far["alpha_t"]) == pytest.approx(2.0) and float(far["beta_t"]) == 0.0


@pytest.mark.parametrize("align_kind", ["projection", "energy"])
def test_sad_loss_total_is_weighted_sum_and_trains_adapters(align_kind):
    targets = _targets()
    loss = SADLoss(targets, alpha=1.5, beta=0.3, align_kind=align_kind, schedule="fixed",
                   kd_weight=0.7, task_weight=0.4, scaling=2.0, kd_temperature=2.0)
    adapters = {n: (_leaf(b), _leaf(a)) for n, (b, a) in _adapters(targets).items()}
    student, teacher = _leaf(_randn(4, 3, seed=0)), _randn(4, 3, seed=1)
    labels = torch.tensor([0, 1, 2, 1])
    out = loss(adapters, student_logits=student, teacher_logits=teacher, labels=labels,
               problem_type="single_label_classification", step=0)
    assert set(out) == {"total", "kd", "task", "align", "coeff", "alpha_t", "beta_t",
                        "alignment"}
    weighted = 0.7 * out["kd"] + 0.4 * out["task"] + out["alpha_t"] * out["align"] + \
        out["beta_t"] * out["coeff"]
    assert torch.equal(out["total"], weighted)
    assert not out["alignment"].requires_grad
    per_layer = {n: alignment_loss(b, targets.basis(g)[g.names.index(n)], kind=align_kind,
                                   singular_values=targets.singular_values(g)[g.names.index(n)])
                 for g in targets.groups for n, (b, _) in
                 ((n, adapters[n]) for n in g.names)}
    assert float(out["align"]) == pytest.approx(float(sum(per_layer.values()) / 3), abs=1e-12)
    out["total"].backward()
    assert all(b.grad is not None and a.grad is not None for b, a in adapters.values())


def test_sad_loss_skips_zero_weight_terms_and_validates():
    logits = _randn(4, 3, seed=0)
    plain = SADLoss(None, alpha=0.0, kd_weight=0.0)
    out = plain({}, student_logits=logits, labels=torch.tensor([0, 1, 2, 0]),
                problem_type="single_label_classification", step=0)
    assert float(out["kd"]) == 0.0 and float(out["align"]) == 0.0
    assert torch.isnan(out["alignment"])
    with pytest.raises(ValueError, match="targets"):
        SADLoss(None, alpha=1.0)
    with pytest.raises(ValueError, match="sigma"):
        SADLoss(_targets(sigma=False), beta=0.1)
    with pytest.raises(ValueError, match="adaptive"):
        SADLoss(_targets(), schedule="cosine")
    with pytest.raises(ValueError, match="teacher_logits"):
        SADLoss(_targets())(_adapters(_targets()), student_logits=logits,
                                    problem_type="single_label_classification", step=0)


def test_sad_loss_causal_lm_kd_covers_scored_tokens_only():
    student, teacher = _randn(2, 6, 11, seed=0), _randn(2, 6, 11, seed=1)
    labels = torch.randint(0, 11, (2, 6), generator=_gen(2))
    labels[0, :3], labels[1, 4:] = -100, -100  # prompt tokens / padding
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    loss = SADLoss(None, alpha=0.0, task_weight=0.0, kd_temperature=2.0)
    out = loss({}, student_logits=student, teacher_logits=teacher, labels=labels,
               problem_type="causal_lm", step=0, mask=attention)
    scored = labels[:, 1:] != -100
    expected = kd_loss(student[:, :-1][scored], teacher[:, :-1][scored], temperature=2.0)
    assert float(out["kd"]) == pytest.approx(float(expected), abs=1e-12)
    noisy = student.clone()
    noisy[:, -1], noisy[0, :2], noisy[1, 3:] = 50.0, -50.0, 9.0
    again = loss({}, student_logits=noisy, teacher_logits=teacher, labels=labels,
                 problem_type="causal_lm", step=0, mask=attention)
    assert float(again["kd"]) == pytest.approx(float(out["kd"]), abs=1e-12)


def test_autocast_bf16_keeps_losses_float32_and_finite():
    targets = _targets(dtype=torch.float32)
    adapters = {n: (b.bfloat16(), a.bfloat16()) for n, (b, a) in _adapters(targets).items()}
    loss = SADLoss(targets, alpha=1.0, beta=0.5, kd_weight=1.0)
    student, teacher = _randn(2, 5, 9, seed=0).bfloat16(), _randn(2, 5, 9, seed=1).bfloat16()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(adapters, student_logits=student, teacher_logits=teacher,
                   labels=torch.randint(0, 9, (2, 5), generator=_gen(2)),
                   problem_type="causal_lm", step=0, mask=mask)
        single = alignment_loss(adapters["l0.q"][0], targets.basis(targets.groups[0])[0])
    for value in (*out.values(), single):
        assert value.dtype == torch.float32 and torch.isfinite(value)
