"""Markdown tables and PNG figures of the synthetic experiment (``synthetic.run_synthetic``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, works on headless CI
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["render_markdown", "write_markdown", "write_figures"]

METHOD_LABELS = {"kd": "KD", "sad_projection": "SAD (projection)", "sad_energy": "SAD (energy)"}
TERM_COLOURS = {"T_I": "tab:red", "T_II": "tab:orange", "T_III": "tab:gray"}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != 0.0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
            return f"{value:.1e}"
        return f"{value:.{digits}g}"
    return str(METHOD_LABELS.get(value, value))


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """Markdown table; ``columns`` are (key, header) pairs."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def _part1(p: dict) -> str:
    cols = [("spectrum", "spectrum"), ("covariance", "Sigma"), ("scale", "s"),
            ("T_I", "T_I"), ("T_II", "T_II"), ("T_III", "T_III"), ("total", "total"),
            ("identity_residual", "residual"), ("mc_relative_difference", "MC diff"),
            ("bounds_hold", "bounds")]
    return (
        "## 1. Theorem 1: exact decomposition of random adapters\n\n"
        f"Terms relative to tr K. Max identity residual |total - (T_I+T_II+T_III)| / total: "
        f"**{p['max_identity_residual']:.1e}**; max relative difference between total and the "
        f"Monte-Carlo mean of ||(dW - sBA)x||^2 over the calibration samples: "
        f"**{p['max_mc_relative_difference']:.1e}**; lower <= T_I <= upper in every case: "
        f"**{_fmt(p['all_bounds_hold'])}**.\n\n" + table(p["rows"], cols))


def _part2(p: dict, cfg: dict) -> str:
    cols = [("spectrum", "spectrum"), ("covariance", "Sigma"), ("energy_threshold", "keep"),
            ("r_star", "r*"), ("tail_r_star_minus_1", "tail(r*-1)"), ("tail_r_star", "tail(r*)"),
            ("optimal_adapter_error", "optimal(r*)"), ("trained_r_star_minus_1", "trained(r*-1)"),
            ("trained_r_star", "trained(r*)"), ("definition_holds", "definition")]
    return (
        "## 2. Theorem 2: rank selection\n\n"
        "Errors relative to tr K; eps = 1 - keep. Definition: tail(r*) <= eps < tail(r*-1). "
        f"Trained: {cfg['rank_optimizer']} (lr {cfg['rank_lr']}, {cfg['rank_steps']} steps) on the "
        "exact expected error from a small random init.\n\n"
        + table(p["rows"], cols))


def _part3(p: dict, cfg: dict) -> str:
    cols = [("gap", "gamma"), ("covariance", "Sigma"), ("method", "method"),
            ("steps_to_delta", "steps to delta"), ("reached", "reached"),
            ("final_excess", "excess"), ("T_I", "T_I"), ("T_II", "T_II"), ("T_III", "T_III"),
            ("alignment_initial", "L_proj start"), ("alignment_final", "L_proj end")]
    return (
        "## 3. Convergence: distillation vs + alpha L_align\n\n"
        f"Rank {cfg['convergence_rank']}, sigma~ = 1 (i <= r), 1/gamma (r < i <= "
        f"{cfg['gap_support']}), 0 beyond; alpha = {cfg['alpha']}, {cfg['optimizer']} lr {cfg['lr']}, "
        f"batch {cfg['batch_size']} fresh samples per step, {cfg['steps']} steps, "
        f"{cfg['num_seeds']} seed(s) (same init and data for every method). Steps to reach "
        f"error <= tail(r) + {cfg['delta']} tr K (median over seeds; '-' if a seed never did); "
        "excess and T terms relative to tr K at the end (means over seeds). L_proj is the "
        "projection misalignment to the top-r eigenvectors U_r: at gamma = 1 U_r is an "
        "arbitrary basis of an optimal subspace, so L_proj need not go to 0 while T_I does.\n\n"
        + table(p["rows"], cols))


def _part4(p: dict) -> str:
    cols = [("spectrum", "spectrum"), ("covariance", "Sigma"), ("rank", "r"),
            ("method", "method"), ("T_I", "T_I"), ("T_II", "T_II"), ("T_III", "T_III"),
            ("total", "total"), ("excess", "excess")]
    return ("## 4. Grid: exact decomposition of trained adapters\n\n"
            "Relative to tr K; excess = total - T_III (what training could still remove).\n\n"
            + table(p["rows"], cols))


def render_markdown(results: dict) -> str:
    """The whole results.md text."""
    cfg = results["config"]
    head = (f"# Synthetic spectral validation\n\nd_out x d_in = {cfg['d_out']} x {cfg['d_in']}, "
            f"float64, seed {cfg['seed']}{' (quick)' if cfg['quick'] else ''}; "
            f"wall time {results['wall_time_s']:.1f} s.\n")
    parts = [head, _part1(results["part1"]), _part2(results["part2"], cfg),
             _part3(results["part3"], cfg), _part4(results["part4"])]
    return "\n\n".join(parts) + "\n"


def write_markdown(results: dict, path: Path) -> Path:
    path.write_text(render_markdown(results))
    return path


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _stacked_terms(ax, rows: list[dict], labels: list[str]) -> None:
    bottom = [0.0] * len(rows)
    for term, colour in TERM_COLOURS.items():
        values = [max(r[term], 0.0) for r in rows]
        ax.bar(range(len(rows)), values, bottom=bottom, color=colour, label=term)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)


def plot_decomposition(results: dict, path: Path) -> Path:
    """Part 1: stacked T_I / T_II / T_III per (spectrum, covariance), one panel per scale."""
    rows = results["part1"]["rows"]
    scales = sorted({r["scale"] for r in rows})
    fig, axes = plt.subplots(1, len(scales), figsize=(4.5 * len(scales), 4), squeeze=False)
    for ax, scale in zip(axes[0], scales):
        chosen = [r for r in rows if r["scale"] == scale]
        _stacked_terms(ax, chosen, [f"{r['spectrum']}/{r['covariance']}" for r in chosen])
        ax.set_title(f"random adapter, s = {scale}")
        ax.set_ylabel("error / tr K")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_convergence(results: dict, path: Path) -> Path:
    """Part 3: excess error vs step, one panel per gap, one line per method (first seed)."""
    runs = [r for r in results["part3"]["runs"] if r["seed"] == 0]
    gaps = sorted({r["gap"] for r in runs})
    covs = list(dict.fromkeys(r["covariance"] for r in runs))
    fig, axes = plt.subplots(len(covs), len(gaps), figsize=(3.6 * len(gaps), 3 * len(covs)),
                             squeeze=False, sharey=True)
    delta = results["config"]["delta"]
    for (i, cov), (j, gap) in ((a, b) for a in enumerate(covs) for b in enumerate(gaps)):
        ax = axes[i][j]
        for run in (r for r in runs if r["gap"] == gap and r["covariance"] == cov):
            curve = run["curve"]
            ax.semilogy(curve["steps"], [max(e, 1e-8) for e in curve["excess"]],
                        label=METHOD_LABELS.get(run["method"], run["method"]))
        ax.axhline(delta, color="k", lw=0.8, ls="--")
        ax.set_title(f"gamma = {gap:g}, {cov}", fontsize=9)
        ax.set_xlabel("step")
    for i in range(len(covs)):
        axes[i][0].set_ylabel("(error - tail) / tr K")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def plot_grid(results: dict, path: Path) -> Path:
    """Part 4: what training left above the optimum (T_I + T_II), per method, log scale.

    T_III (the rank residual) is the same for every method and would hide the differences.
    """
    rows = results["part4"]["rows"]
    spectra = list(dict.fromkeys(r["spectrum"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(len(spectra), 1, figsize=(10, 2.8 * len(spectra)), squeeze=False)
    width = 0.8 / len(methods)
    for ax, spectrum in zip(axes[:, 0], spectra):
        cases = list(dict.fromkeys((r["covariance"], r["rank"]) for r in rows
                                   if r["spectrum"] == spectrum))
        for m, method in enumerate(methods):
            chosen = {(r["covariance"], r["rank"]): r for r in rows
                      if r["spectrum"] == spectrum and r["method"] == method}
            heights = [max(chosen[c]["T_I"] + chosen[c]["T_II"], 1e-12) for c in cases]
            ax.bar([i + m * width for i in range(len(cases))], heights, width,
                   label=METHOD_LABELS.get(method, method))
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))],
                      [f"{cov[:3]} r{rank}" for cov, rank in cases], fontsize=7)
        ax.set_title(f"{spectrum} spectrum: (T_I + T_II) / tr K of the trained adapters",
                     fontsize=9)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


FIGURES: dict[str, Callable[[dict, Path], Path]] = {
    "part1_decomposition.png": plot_decomposition,
    "part3_convergence.png": plot_convergence,
    "part4_grid.png": plot_grid,
}


def write_figures(results: dict, out: Path) -> list[Path]:
    """Write every figure of FIGURES into ``out``; returns their paths."""
    return [plot(results, out / name) for name, plot in FIGURES.items()]
