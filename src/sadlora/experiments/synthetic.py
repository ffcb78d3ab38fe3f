"""The controlled spectral validation experiment on one linear layer (DESIGN.md §1).

A synthetic update dW (d_out x d_in) is built so that its *data-weighted* singular values
sigma~ = sv(dW Sigma^{1/2}) are exactly a chosen spectrum: dW = U diag(s) V^T Sigma^{-1/2} with
random orthonormal U, V. Four parts, all in float64:

1. Theorem 1: the exact decomposition total = T_I + T_II + T_III of random adapters, measured
   with the empirical Sigma_hat = X^T X / n of n calibration samples (so ``total`` is also the
   Monte-Carlo mean of ||(dW - s B A) x||^2 over those samples), and the bounds on T_I.
2. Theorem 2: r*(eps) from ``select_ranks`` against the optimal rank-r error (the tail) and
   adapters trained (Adam by default) on the exact expected error at ranks r*-1 and r*.
3. Convergence: distillation alone vs + alpha L_align (projection / energy) from one init and
   one stream of fresh samples x ~ N(0, Sigma), for spectral gaps gamma at the target rank.
4. The grid: ranks x {KD, SAD} x spectra x covariances, each final adapter decomposed.

Parts 2-4 measure against the population Sigma, the second moment of the training stream: the
claims there are about the expected loss being minimised, and an estimated Sigma_hat would add
an O(sqrt(d_in / n)) mismatch between what is trained and what is measured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..spectral import optimal_adapter, select_ranks
from .common import BaseConfig, setup_logging, write_json
from .synthetic_layer import (
    COVARIANCES,
    METHODS,
    OPTIMIZERS,
    SPECTRA,
    Problem,
    decomposition_row,
    gap_spectrum,
    initial_adapter,
    make_problem,
    psd_power,
    random_adapter,
    train_adapters,
)

__all__ = ["SyntheticConfig", "run_synthetic", "train_adapters", "effective_config", "METHODS",
           "OPTIMIZERS", "SPECTRA", "COVARIANCES", "gap_spectrum", "make_problem"]

log = logging.getLogger(__name__)
F64 = torch.float64


@dataclass
class SyntheticConfig(BaseConfig):
    """Configuration of the synthetic experiment (``configs/exp_synthetic.yaml``)."""

    output_dir: str = "outputs/synthetic"  # results.json, results.md and PNG figures go here
    quick: bool = False  # seconds-long run for tests: QUICK_OVERRIDES replace those keys
    d_out: int = 64  # rows of dW (output dimension of the layer)
    d_in: int = 96  # columns of dW (input dimension); needs d_in >= d_out
    num_samples: int = 2048  # calibration samples n behind Sigma_hat in part 1 (n >= d_in)
    condition_number: float = 100.0  # eigenvalue ratio of the exponential input covariances
    sharp_decay: float = 0.6  # "sharp" spectrum: sigma_i = sharp_decay^(i-1)
    power_exponent: float = 1.0  # "gradual" spectrum: sigma_i = i^(-power_exponent)
    spectra: list[str] = field(default_factory=lambda: ["sharp", "gradual", "flat"])  # SPECTRA
    covariances: list[str] = field(
        default_factory=lambda: ["identity", "exponential", "rotated"])  # COVARIANCES keys
    adapter_scales: list[float] = field(default_factory=lambda: [0.1, 1.0, 3.0])  # part 1: s
    decomposition_rank: int = 4  # part 1: rank of the random adapters
    energy_thresholds: list[float] = field(default_factory=lambda: [0.8, 0.9, 0.95])  # part 2
    gaps: list[float] = field(default_factory=lambda: [1.0, 1.5, 3.0, 10.0])  # part 3: gamma
    gap_support: int = 8  # part 3: number of nonzero sigma~ (top rank at 1, the rest at 1/gamma)
    convergence_rank: int = 4  # part 3: adapter rank r = the rank where the gap sits
    convergence_methods: list[str] = field(
        default_factory=lambda: ["kd", "sad_projection", "sad_energy"])  # part 3: METHODS keys
    num_seeds: int = 3  # part 3: inits / data streams per (gap, covariance)
    grid_ranks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # part 4 ranks
    grid_methods: list[str] = field(default_factory=lambda: ["kd", "sad_projection"])  # part 4
    alpha: float = 0.1  # weight of L_align (the distillation loss is divided by tr K)
    target_k: int = 16  # stored target directions U_k, sigma~_k (r_max) for the energy loss
    optimizer: str = "sgd"  # parts 3-4 (OPTIMIZERS key): plain SGD is the gradient flow of Thm 3
    lr: float = 0.3  # parts 3-4 learning rate
    steps: int = 300  # parts 3-4 optimiser steps per run
    batch_size: int = 256  # parts 3-4 fresh samples per step
    rank_optimizer: str = "adam"  # part 2 optimiser (on the exact expected error)
    rank_lr: float = 0.01  # part 2 learning rate
    rank_steps: int = 400  # part 2 optimiser steps per run
    init_std: float = 0.01  # std of the small random B and A (B = 0 makes L_align undefined)
    delta: float = 0.01  # part 3: "converged" when error - tail(r) <= delta * tr K
    eval_every: int = 2  # steps between exact evaluations of the training curve


# Small sizes and fewer cases for tests: every part still runs, in a few seconds.
QUICK_OVERRIDES = {
    "d_out": 16, "d_in": 24, "num_samples": 256, "covariances": ["identity", "rotated"],
    "adapter_scales": [0.1, 3.0], "energy_thresholds": [0.9], "gaps": [1.0, 10.0],
    "gap_support": 4, "convergence_rank": 2, "num_seeds": 1, "grid_ranks": [1, 2],
    "target_k": 8, "steps": 120, "rank_steps": 150, "batch_size": 64, "eval_every": 4,
}


def _generator(cfg: SyntheticConfig, *keys) -> torch.Generator:
    # One reproducible stream per named case (part, spectrum, covariance, ...): adding or
    # removing a case never shifts the others. sha256, not hash(): str hashes vary per process.
    digest = hashlib.sha256(repr((cfg.seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _distill_settings(cfg: SyntheticConfig) -> dict:
    return {"optimizer": cfg.optimizer, "lr": cfg.lr, "steps": cfg.steps}


def _rank_fit_settings(cfg: SyntheticConfig) -> dict:
    return {"optimizer": cfg.rank_optimizer, "lr": cfg.rank_lr, "steps": cfg.rank_steps}


def _population(cfg: SyntheticConfig, cov: str, g: torch.Generator) -> torch.Tensor:
    return COVARIANCES[cov](cfg.d_in, cfg, g)


# --------------------------------------------------------------------------------------------
# Part 1: Theorem 1
# --------------------------------------------------------------------------------------------


def part1_decomposition(cfg: SyntheticConfig) -> dict:
    """Theorem 1 on random adapters, with Sigma_hat from n calibration samples.

    dW is built against Sigma_hat itself, so the data-weighted spectrum seen by the
    decomposition is exactly the named one (e.g. truly flat: T_I = 0 for every B).
    """
    rows = []
    for spectrum in cfg.spectra:
        for cov in cfg.covariances:
            g = _generator(cfg, "part1", spectrum, cov)
            root = psd_power(_population(cfg, cov, g), 0.5)
            x = torch.randn(cfg.num_samples, cfg.d_in, generator=g, dtype=F64) @ root
            sigma_hat = x.T @ x / cfg.num_samples
            values = SPECTRA[spectrum](cfg.d_out, cfg)
            problem = make_problem(values, sigma_hat, cfg.d_out, g)
            for scale in cfg.adapter_scales:
                b, a = random_adapter(problem, cfg.decomposition_rank, g)
                row = decomposition_row(problem, b, a, scaling=scale)
                residual = x @ (problem.delta_w - scale * b @ a).T
                monte_carlo = float(residual.square().sum(1).mean()) / problem.energy
                rows.append({"spectrum": spectrum, "covariance": cov, "scale": scale, **row,
                             "mc_relative_difference": abs(monte_carlo - row["total"])
                             / row["total"]})
    return {
        "rows": rows,
        "max_identity_residual": max(r["identity_residual"] for r in rows),
        "max_mc_relative_difference": max(r["mc_relative_difference"] for r in rows),
        "all_bounds_hold": all(r["bounds_hold"] for r in rows),
    }


# --------------------------------------------------------------------------------------------
# Parts 2-4
# --------------------------------------------------------------------------------------------


def _threshold_row(problem: Problem, threshold: float) -> dict:
    """r*(eps) from select_ranks, the tails around it and the error of the optimal adapter."""
    eps = 1.0 - threshold
    r_star = select_ranks([problem.subspace.singular_values], energy_threshold=threshold,
                          total_energy_by_layer=[problem.subspace.total_energy])["0"]
    tails = {r: problem.tail(r) / problem.energy for r in (r_star - 1, r_star)}
    b, a = optimal_adapter(problem.delta_w, problem.sigma, r_star)
    return {
        "energy_threshold": threshold, "eps": eps, "r_star": r_star,
        "tail_r_star_minus_1": tails[r_star - 1], "tail_r_star": tails[r_star],
        "optimal_adapter_error": float(problem.error(b, a)) / problem.energy,
        # r_star == 1 is the clip at min_rank: tail(0) = tr K > eps tr K holds trivially.
        "definition_holds": tails[r_star] <= eps * (1 + 1e-12)
        and tails[r_star - 1] > eps,
    }


def part2_rank_selection(cfg: SyntheticConfig) -> dict:
    """Theorem 2: r*(eps) vs the optimal and the trained errors at ranks r*-1 and r*.

    The trained adapters minimise the exact expected error (no sampling noise), so what is
    left above tail(r) is optimisation error only.
    """
    rows = []
    for spectrum, cov, _g, problem in _problems(cfg, "part2"):
        found = [_threshold_row(problem, t) for t in cfg.energy_thresholds]
        trained = {0: 1.0}  # rank 0 (no adapter) leaves the whole energy
        for rank in sorted({r for row in found for r in (row["r_star"] - 1, row["r_star"])}):
            if rank > 0:
                init = initial_adapter(problem, rank, cfg,
                                       _generator(cfg, "part2", spectrum, cov, rank))
                (run,) = train_adapters(problem, init, ["kd"], cfg, **_rank_fit_settings(cfg))
                trained[rank] = run["excess"][-1] + problem.tail(rank) / problem.energy
        rows += [{"spectrum": spectrum, "covariance": cov, **row,
                  "trained_r_star_minus_1": trained[row["r_star"] - 1],
                  "trained_r_star": trained[row["r_star"]]} for row in found]
    return {"rows": rows, "all_definitions_hold": all(r["definition_holds"] for r in rows)}


def _final_row(problem: Problem, run: dict, initial_alignment: float) -> dict:
    row = decomposition_row(problem, run["B"], run["A"])
    return {"steps_to_delta": run["steps_to_delta"], "final_excess": run["excess"][-1],
            "T_I": row["T_I"], "T_II": row["T_II"], "T_III": row["T_III"],
            "total": row["total"], "alignment_initial": initial_alignment,
            "alignment_final": row["alignment_loss"]}


def part3_convergence(cfg: SyntheticConfig) -> dict:
    """Distillation vs + alpha L_align from one init and data stream, per gap gamma."""
    runs, r = [], cfg.convergence_rank
    cases = [(gap, cov, seed) for gap in cfg.gaps for cov in cfg.covariances
             for seed in range(cfg.num_seeds)]
    for gap, cov, seed in tqdm(cases, desc="part 3", leave=False):
        g = _generator(cfg, "part3", gap, cov, seed)
        values = gap_spectrum(cfg.d_out, r, gap, cfg.gap_support)
        problem = make_problem(values, _population(cfg, cov, g), cfg.d_out, g)
        init = initial_adapter(problem, r, cfg, g)
        start = decomposition_row(problem, *init)["alignment_loss"]
        # Same init and same minibatches for every method: only the loss differs.
        for run in train_adapters(problem, init, cfg.convergence_methods, cfg,
                                  data_seed=_generator(cfg, "part3", gap, cov, seed, "data"),
                                  **_distill_settings(cfg)):
            runs.append({"gap": gap, "covariance": cov, "seed": seed, "method": run["method"],
                         **_final_row(problem, run, start),
                         "curve": {"steps": run["steps"], "excess": run["excess"]}})
    return {"runs": runs, "rows": summarise_convergence(runs)}


def summarise_convergence(runs: list[dict]) -> list[dict]:
    """Per (gap, covariance, method): median steps (None if a seed never got there), means."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["gap"], run["covariance"], run["method"]), []).append(run)
    rows = []
    for (gap, cov, method), members in groups.items():
        hits = [m["steps_to_delta"] for m in members]
        mean = {key: statistics.fmean(m[key] for m in members) for key in (
            "final_excess", "T_I", "T_II", "T_III", "alignment_initial", "alignment_final")}
        rows.append({"gap": gap, "covariance": cov, "method": method,
                     "steps_to_delta": None if None in hits else statistics.median(hits),
                     "reached": sum(h is not None for h in hits), "seeds": len(hits), **mean})
    return rows


def _problems(cfg: SyntheticConfig, part: str):
    """(spectrum, covariance, generator, problem) for every case of a part, with progress;
    the generator is seeded per (part, case) and has made the problem."""
    cases = [(s, c) for s in cfg.spectra for c in cfg.covariances]
    for spectrum, cov in tqdm(cases, desc=part.replace("part", "part "), leave=False):
        g = _generator(cfg, part, spectrum, cov)
        yield spectrum, cov, g, make_problem(SPECTRA[spectrum](cfg.d_out, cfg),
                                             _population(cfg, cov, g), cfg.d_out, g)


def part4_grid(cfg: SyntheticConfig) -> dict:
    """ranks x methods x spectra x covariances: exact decomposition of each trained adapter."""
    rows = []
    for spectrum, cov, g, problem in _problems(cfg, "part4"):
        for rank in cfg.grid_ranks:
            init = initial_adapter(problem, rank, cfg, g)
            for run in train_adapters(problem, init, cfg.grid_methods, cfg,
                                      data_seed=_generator(cfg, "part4", spectrum, cov, rank),
                                      **_distill_settings(cfg)):
                row = decomposition_row(problem, run["B"], run["A"])
                rows.append({"spectrum": spectrum, "covariance": cov, "rank": rank,
                             "method": run["method"], "T_I": row["T_I"], "T_II": row["T_II"],
                             "T_III": row["T_III"], "total": row["total"],
                             "excess": run["excess"][-1]})
    return {"rows": rows}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def effective_config(config: SyntheticConfig) -> SyntheticConfig:
    """The config actually run: ``quick`` replaces the sizes by QUICK_OVERRIDES; validated."""
    cfg = dataclasses.replace(config, **QUICK_OVERRIDES) if config.quick else config
    for name, registry, chosen in (("spectra", SPECTRA, cfg.spectra),
                                   ("covariances", COVARIANCES, cfg.covariances),
                                   ("methods", METHODS, cfg.convergence_methods + cfg.grid_methods),
                                   ("optimizers", OPTIMIZERS, [cfg.optimizer, cfg.rank_optimizer])):
        unknown = sorted(set(chosen) - set(registry))
        if unknown:
            raise ValueError(f"unknown {name} {unknown}; choose from {sorted(registry)}.")
    if not cfg.d_out <= cfg.d_in <= cfg.num_samples:
        raise ValueError(f"need d_out <= d_in <= num_samples, got d_out={cfg.d_out}, "
                         f"d_in={cfg.d_in}, num_samples={cfg.num_samples}.")
    if not cfg.convergence_rank < cfg.gap_support <= cfg.d_out:
        raise ValueError(f"need convergence_rank < gap_support <= d_out, got "
                         f"{cfg.convergence_rank}, {cfg.gap_support}, {cfg.d_out}.")
    return cfg


def run_synthetic(config: SyntheticConfig) -> dict:
    """Run all four parts; write results.json, results.md and figures; return the results."""
    from .synthetic_report import write_figures, write_markdown  # matplotlib only when run

    setup_logging(config.log_level)
    cfg = effective_config(config)
    start, threads = time.perf_counter(), torch.get_num_threads()
    results: dict = {"config": dataclasses.asdict(cfg)}
    # The matrices are tiny: intra-op threads only add synchronisation (several times slower on
    # busy cores), so run single-threaded and restore the caller's setting afterwards.
    torch.set_num_threads(1)
    try:
        for name, part in (("part1", part1_decomposition), ("part2", part2_rank_selection),
                           ("part3", part3_convergence), ("part4", part4_grid)):
            tick = time.perf_counter()
            results[name] = part(cfg)
            log.info("%s done in %.1f s", name, time.perf_counter() - tick)
    finally:
        torch.set_num_threads(threads)
    results["wall_time_s"] = time.perf_counter() - start
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results["figures"] = [str(p) for p in write_figures(results, out)]
    write_markdown(results, out / "results.md")
    write_json(results, out / "results.json")
    log.info("synthetic experiment: %.1f s, max identity residual %.2e; wrote %s",
             results["wall_time_s"], results["part1"]["max_identity_residual"], out)
    return results

