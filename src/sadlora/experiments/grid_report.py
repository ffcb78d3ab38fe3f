"""Aggregate tables and figures of a distillation grid (``grid.run_grid``).

Per task, per (variant, rank): mean +- sample std over seeds of every metric of every reported
split, and of the mean alignment. The rank column is the grid's rank, or "mean (min-max)" of the
per-layer LoRA ranks when a run's layers have other ranks (``rank_from_targets``). The
"forgetting" column is the drop (x 100) of the STS-B test cosine-similarity Spearman of the
merged student's mean-pooled embeddings against its pretrained base's (``grid_forgetting``;
> 0: the pretrained representation was damaged). Writes
``<name>.json``, ``<name>.md``, ``<name>_metric_vs_rank.png`` and ``<name>_principal_angles.png``
into the grid's output folder (``name`` = ``GridConfig.report_name``).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on headless machines
import matplotlib.pyplot as plt  # noqa: E402

from ..runs import write_json  # noqa: E402

__all__ = ["aggregate", "render_markdown", "write_report"]


def _mean_std(values: list[float]) -> dict:
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def _layer_rank_summary(members: list[dict]) -> dict | None:
    """{mean, min, max} of the per-layer LoRA ranks of a row's runs (pooled over seeds), or None
    when none recorded them (runs written before ``layer_ranks`` was)."""
    ranks = [r for member in members for r in (member.get("layer_ranks") or {}).values()]
    if not ranks:
        return None
    return {"mean": statistics.fmean(ranks), "min": min(ranks), "max": max(ranks)}


def _rank_text(rank: int, layer_ranks: dict | None) -> str:
    """The grid rank, or the per-layer ranks "6.5 (2-14)" when they are not all that rank."""
    if not layer_ranks or layer_ranks["min"] == layer_ranks["max"] == rank:
        return str(rank)
    if layer_ranks["min"] == layer_ranks["max"]:
        return str(layer_ranks["min"])
    return f"{layer_ranks['mean']:.1f} ({layer_ranks['min']}-{layer_ranks['max']})"


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (task, variant, rank): {split: {metric: mean/std/n}}, alignment, seconds,
    and the summary of the per-layer ranks (``layer_ranks``: mean/min/max, or None)."""
    groups = defaultdict(list)
    for run in runs:
        groups[(run["task"], run["variant"], run["rank"])].append(run)
    rows = []
    for (task, variant, rank), members in groups.items():
        splits = {}
        for split in members[0]["metrics"]:
            names = members[0]["metrics"][split]
            splits[split] = {name: _mean_std([m["metrics"][split][name] for m in members])
                             for name in names}
        rows.append({"task": task, "variant": variant, "method": members[0]["method"],
                     "primary_metric": members[0]["primary_metric"],
                     "rank": rank, "seeds": sorted(m["seed"] for m in members),
                     "layer_ranks": _layer_rank_summary(members), "metrics": splits,
                     "mean_alignment": _mean_std([m["mean_alignment"] for m in members]),
                     "forgetting": _mean_std([(m.get("forgetting") or {}).get("spearman_drop")
                                              for m in members]),
                     "seconds": _mean_std([m["seconds"] for m in members])})
    return rows


def _cell(stat: dict, scale: float = 100.0) -> str:
    if not stat or stat["mean"] is None:
        return "-"
    if stat["n"] > 1:
        return f"{scale * stat['mean']:.1f} ± {scale * stat['std']:.1f}"
    return f"{scale * stat['mean']:.1f}"


def render_markdown(teachers: list[dict], rows: list[dict], splits: list[str]) -> str:
    """A table per task: teachers first, then each (variant, rank)."""
    out = []
    metrics = {r["task"]: r["primary_metric"] for r in [*teachers, *rows]}
    for task, metric in metrics.items():
        header = ["model", "rank", "seeds"] + [f"{s} {metric}" for s in splits]
        header += ["alignment", "forgetting Δρ", "s / run"]
        lines = [f"### {task} ({metric} x 100, mean ± std over seeds; final weights, no "
                 f"model selection on a reported split)", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for teacher in (t for t in teachers if t["task"] == task):
            cells = [f"{teacher['role']} ({teacher['model']}, full FT)", "-", "1"]
            cells += [_cell({"mean": teacher["metrics"].get(s, {}).get(metric), "std": 0, "n": 1})
                      for s in splits]
            cells += ["-", "-", f"{teacher['seconds']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        # By rank, then in the grid's variant order (rows arrive in that order).
        for row in sorted((r for r in rows if r["task"] == task), key=lambda r: r["rank"]):
            cells = [row["variant"], _rank_text(row["rank"], row.get("layer_ranks")),
                     str(len(row["seeds"]))]
            cells += [_cell(row["metrics"].get(s, {}).get(metric)) for s in splits]
            alignment = row["mean_alignment"]
            cells += [_cell(alignment, 1.0) if alignment["mean"] is None else
                      f"{alignment['mean']:.3f}", _cell(row.get("forgetting"), 100.0),
                      f"{row['seconds']['mean']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _plot_metric_vs_rank(rows: list[dict], split: str, path: Path) -> None:
    """Metric vs rank per variant (error bars: std over seeds); bars per variant for one rank."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task and split in r["metrics"]]
        metric = mine[0]["primary_metric"] if mine else ""
        variants = list(dict.fromkeys(r["variant"] for r in mine))
        stats = {(r["variant"], r["rank"]): r["metrics"][split][metric] for r in mine}
        ranks = sorted({r["rank"] for r in mine})
        if len(ranks) == 1:
            values = [stats[(v, ranks[0])] for v in variants]
            axis.bar(range(len(variants)), [v["mean"] for v in values],
                     yerr=[v["std"] for v in values], capsize=3, color="tab:blue")
            axis.set_xticks(range(len(variants)))
            axis.set_xticklabels(variants, rotation=45, ha="right", fontsize=7)
            low = min(v["mean"] - v["std"] for v in values)
            high = max(v["mean"] + v["std"] for v in values)
            axis.set_ylim(low - 0.1 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
            axis.set_title(f"{task} (r = {ranks[0]})")
        else:
            for variant in variants:
                points = [(rank, stats[(variant, rank)]) for rank in ranks
                          if (variant, rank) in stats]
                axis.errorbar([p[0] for p in points], [p[1]["mean"] for p in points],
                              yerr=[p[1]["std"] for p in points], marker="o", capsize=3,
                              label=variant)
            axis.set_xscale("log", base=2)
            axis.set_xlabel("LoRA rank r")
            axis.legend(fontsize=7)
            axis.set_title(task)
        axis.set_ylabel(f"{split} {metric}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_principal_angles(runs: list[dict], path: Path) -> None:
    """Mean principal angle (degrees) to the target subspace per adapted layer, per variant
    (first seed, largest rank): how far each method's column space is from the teacher's."""
    chosen = {}
    for run in runs:
        key = (run["task"], run["variant"])
        if run["layers"] and (key not in chosen or (run["rank"], -run["seed"]) >
                              (chosen[key]["rank"], -chosen[key]["seed"])):
            chosen[key] = run
    if not chosen:
        return
    tasks = list(dict.fromkeys(task for task, _ in chosen))
    figure, axes = plt.subplots(len(tasks), 1, figsize=(10, 3.4 * len(tasks)), squeeze=False)
    for axis, task in zip(axes[:, 0], tasks):
        for (run_task, variant), run in chosen.items():
            if run_task != task:
                continue
            names = list(run["layers"])
            means = [statistics.fmean(run["layers"][n]["angles_deg"]) for n in names]
            rank = _rank_text(run["rank"], _layer_rank_summary([run]))
            axis.plot(range(len(names)), means, marker="o", label=f"{variant} (r={rank})")
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels([_short(n) for n in names], rotation=60, fontsize=6, ha="right")
        axis.set_ylabel("mean principal angle (deg)")
        axis.set_ylim(0, 90)
        axis.set_title(f"{task}: adapter column space vs the teacher's data-weighted subspace")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _short(module_name: str) -> str:
    parts = module_name.split(".")
    layer = next((p for p in parts if p.isdigit()), "")
    return f"{layer}.{parts[-1]}" if layer else parts[-1]


def write_report(config, results: dict) -> dict:
    """Aggregate, then write results.json, results.md and the figures; returns the aggregate."""
    folder = Path(config.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    rows = aggregate(results["runs"])
    splits = list(config.eval_splits)
    markdown = render_markdown(results["teachers"], rows, splits)
    name = config.report_name
    (folder / f"{name}.md").write_text(markdown)
    figures = []
    if rows:
        figures.append(folder / f"{name}_metric_vs_rank.png")
        _plot_metric_vs_rank(rows, splits[0], figures[-1])
    if any(run["layers"] for run in results["runs"]):
        figures.append(folder / f"{name}_principal_angles.png")
        _plot_principal_angles(results["runs"], figures[-1])
    report = {"teachers": results["teachers"], "rows": rows, "markdown": markdown,
              "markdown_path": str(folder / f"{name}.md"), "figures": [str(f) for f in figures],
              "runs": [{k: v for k, v in run.items() if k != "layers"}
                       for run in results["runs"]]}
    write_json(folder / f"{name}.json", report)
    return report
