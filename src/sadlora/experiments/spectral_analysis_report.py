"""Markdown tables and PNG figures of the spectral analysis (``spectral_analysis``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["render_markdown", "write_markdown", "write_figures"]

TERM_COLOURS = {"T_I": "tab:red", "T_II": "tab:orange", "T_III": "tab:gray"}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0.0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
            return f"{value:.1e}"
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def _short(name: str) -> str:
    """A layer name short enough for a table: the last four components."""
    return ".".join(name.split(".")[-4:])


def render_markdown(results: dict) -> str:
    config, methods = results["config"], results["methods"]
    summary_rows = [[label, m["summary"]["alignment"], m["summary"]["random_alignment"],
                     m["summary"]["mean_angle_deg"], m["summary"]["effective_rank"],
                     m["summary"]["value_ratio"], m["summary"]["intruders_total"],
                     m["summary"]["T_I_relative"], m["summary"]["T_II_relative"],
                     m["summary"]["T_III_relative"], m["summary"]["total_relative"],
                     m["summary"]["max_identity_residual"]] for label, m in methods.items()]
    reference = results.get("full_finetune_reference")
    baselines = results["random_direction_baseline"]
    lines = [
        "# Spectral analysis of trained adapters", "",
        "Per method, means over the adapted layers. alignment = (1/r) sum cos^2 theta_i between "
        "colspan(B) and the target span(U_r) (a random subspace scores r/d_out, column "
        "'random'); angle = mean principal angle; eff. rank = exp-entropy effective rank of "
        "the adapter's data-weighted singular values sv(M Sigma^{1/2}); sv ratio = mean of "
        "sigma^_i / sigma~_i (1 = the adapter has the target's data-weighted magnitudes); "
        "T_I / T_II / T_III / total = terms of E||(dW - M) x||^2 relative to tr K (each "
        "layer's own), with residual = max |total - (T_I + T_II + T_III)| / tr K.", "",
        *_table(["method", "alignment", "random", "angle (deg)", "eff. rank", "sv ratio",
                 "intruders", "T_I", "T_II", "T_III", "total", "residual"], summary_rows), "",
        "## Intruder dimensions", "",
        f"Top {config['intruder_top_k']} left singular vectors of W0 + M per layer; a vector is "
        f"an intruder when its largest |cos| with every left singular vector of W0 is below "
        f"**{config['intruder_threshold']}**. What a random unit vector scores against the same "
        f"W0 bases ({config['random_directions']} samples):", "",
        *_table(["weight shape", "mean max|cos|", "95th pct", "fraction < threshold"],
                [[k, v["mean"], v["p95"], v["intruder_fraction"]] for k, v in baselines.items()]),
        "",
    ]
    if reference is not None:
        lines += [f"Full fine-tuning reference (spectral teacher W0 + dW): "
                  f"{reference['intruders_total']} intruders in all "
                  f"({reference['intruders_per_layer']:.2f} per layer).", ""]
    for label, m in methods.items():
        rows = [[_short(name), v["alignment"], min(v["angles_deg"]), max(v["angles_deg"]),
                 v["effective_rank"], v["adapter_values"][0], v["target_values"][0],
                 v["intruders"]["count"], v["decomposition"]["T_I_relative"],
                 v["decomposition"]["T_II_relative"], v["decomposition"]["T_III_relative"]]
                for name, v in m["layers"].items()]
        lines += [f"## {label} (`{m['folder']}`, scaling {m['scaling']:g})", "",
                  *_table(["layer", "alignment", "min angle", "max angle", "eff. rank",
                           "sigma^_1", "sigma~_1", "intruders", "T_I", "T_II", "T_III"], rows),
                  ""]
    lines.append(f"Wall time {results['wall_time_s']:.1f} s.")
    return "\n".join(lines) + "\n"


def write_markdown(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(results))
    return path


def _angles_figure(methods: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, m in methods.items():
        layers = list(m["layers"].values())
        x = range(len(layers))
        mean = [sum(v["angles_deg"]) / len(v["angles_deg"]) for v in layers]
        line, = ax.plot(x, mean, marker="o", ms=3, label=label)
        ax.fill_between(x, [min(v["angles_deg"]) for v in layers],
                        [max(v["angles_deg"]) for v in layers], color=line.get_color(),
                        alpha=0.15)
    ax.set_xlabel("adapted layer (model order)")
    ax.set_ylabel("principal angle (degrees)")
    ax.set_title("Principal angles between colspan(B) and span(U_r): mean, band = min..max")
    ax.set_ylim(0, 90)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _decomposition_figure(methods: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(methods) + 2), 4.5))
    labels = list(methods)
    bottom = [0.0] * len(labels)
    for term, colour in TERM_COLOURS.items():
        heights = [methods[label]["summary"][f"{term}_relative"] for label in labels]
        ax.bar(labels, heights, bottom=bottom, color=colour, label=term)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("E||(dW - M)x||^2 / tr K (mean over layers)")
    ax.set_title("Exact decomposition: misalignment / coefficients / rank residual")
    ax.legend()
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_figures(results: dict, output_dir: str | Path) -> list[Path]:
    """principal_angles.png and decomposition.png in ``output_dir``."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    methods = results["methods"]
    return [_angles_figure(methods, output / "principal_angles.png"),
            _decomposition_figure(methods, output / "decomposition.png")]
