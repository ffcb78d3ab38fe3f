"""Spectral analysis of trained adapters of any method (the seed's run_spectral_analysis.py).

Input: folders written by ``sadlora distill`` (PEFT adapter + sad_config.json [+ targets/]),
and one targets folder built with ``keep_sigma`` and ``keep_delta_w`` (the defaults of
``sadlora extract``) used for every run, so that every method is measured against the same
Sigma, dW and U_r. Per layer (``sadlora.adapter_analysis.analyse_layer``): alignment and
principal angles of colspan(B) with span(U_r), adapter singular values in data-weighted units
next to sigma~, effective rank, intruder dimensions against the singular vectors of W0 (with
the score of a random direction), and the exact decomposition T_I / T_II / T_III of
E||(dW - M) x||^2. As a reference, the intruders of the spectral teacher W0 + dW itself (full
fine-tuning) are measured the same way.

Output: results.json, results.md and PNG figures in ``output_dir``.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapter_analysis import (
    analyse_layer,
    intruder_dimensions,
    random_direction_similarity,
)
from ..runs import DataConfig, load_model, load_raw_splits
from ..student import load_student, lora_factors, lora_scaling
from ..targets import SpectralTargets, load_targets
from .common import BaseConfig, setup_logging, write_json
from .spectral_analysis_report import write_figures, write_markdown

__all__ = ["SpectralAnalysisConfig", "run_spectral_analysis", "load_run", "resolve_targets"]

log = logging.getLogger(__name__)


@dataclass
class SpectralAnalysisConfig(BaseConfig):
    """Configuration of the spectral analysis (``configs/exp_spectral_analysis.yaml``)."""

    output_dir: str = "outputs/spectral_analysis"
    runs: dict | list = field(default_factory=dict)  # {label: distill folder} or [folders]
    targets: str | None = None  # targets for every run (default: each run's targets/)
    intruder_top_k: int = 10  # top singular vectors of W0 + M examined
    intruder_threshold: float = 0.5  # |cos| below which a direction is an intruder
    random_directions: int = 2000  # Monte-Carlo size of the random-direction baseline
    full_finetune_reference: bool = True  # intruders of the spectral teacher W0 + dW
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _run_config(run_dir: Path) -> dict:
    path = run_dir / "sad_config.json"
    if not (run_dir / "adapter_config.json").is_file() or not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a `sadlora distill` output folder (needs "
                                f"adapter_config.json and sad_config.json).")
    return json.loads(path.read_text())


def resolve_targets(run_dir: Path, run_config: dict, explicit: str | None) -> SpectralTargets:
    """The targets to measure against: ``explicit``, else run_dir/targets, else the run's
    ``targets`` setting. They must hold Sigma and dW (``keep_sigma``/``keep_delta_w``)."""
    candidates = [explicit] if explicit else [run_dir / "targets", run_config.get("targets")]
    folder = next((Path(c) for c in candidates if c and Path(c).is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"no targets for {run_dir}: tried {candidates}. Set targets= "
                                f"to a folder from `sadlora extract`.")
    targets = load_targets(folder)
    lacking = [n for n, t in targets.layers.items() if t.sigma is None or t.delta_w is None]
    if lacking:
        raise ValueError(f"targets {folder} lack Sigma or dW for {lacking[:3]}...: the analysis "
                         f"needs both; re-run `sadlora extract keep_sigma=true "
                         f"keep_delta_w=true`.")
    return targets


def _task_spec(run_config: dict):
    data = DataConfig(task=run_config["task"], data_dir=run_config.get("data_dir"),
                      task_options=run_config.get("task_options") or {}, eval_splits=[])
    return load_raw_splits(data)[0]  # None for instruction (causal LM) tasks


@torch.no_grad()
def load_run(run_dir: str | Path, targets: str | None = None) -> dict:
    """Everything ``analyse_layer`` needs for each adapted layer that has a target.

    Returns {"method", "scaling", "targets", "layers": {name: {w0, b, a, shift}}}, tensors on
    the CPU; ``shift`` = base-layer weight - W0 (PiSSA's residual) or None.
    """
    run_dir = Path(run_dir)
    run_config = _run_config(run_dir)
    spectral = resolve_targets(run_dir, run_config, targets)
    base, _ = load_model(run_config["student_model"], _task_spec(run_config))
    names = [n for n, _ in base.named_modules() if n in spectral.layers]
    originals = {n: base.get_submodule(n).weight.detach().clone() for n in names}
    student = load_student(base, run_dir)
    factors, scaling = lora_factors(student), lora_scaling(student)
    layers = {}
    for name, (b, a) in factors.items():
        if name not in spectral.layers:
            continue
        current = student.base_model.model.get_submodule(name).base_layer.weight.detach()
        shift = current - originals[name]
        layers[name] = {"w0": originals[name], "b": b.detach().clone(), "a": a.detach().clone(),
                        "shift": shift if bool(shift.any()) else None}
    if not layers:
        raise ValueError(f"no adapted layer of {run_dir} has a target (adapted: "
                         f"{list(factors)[:3]}..., targets: {list(spectral.layers)[:3]}...).")
    return {"method": run_config.get("method"), "scaling": scaling, "targets": spectral,
            "layers": layers}


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------


def analyse_run(run: dict, config: SpectralAnalysisConfig) -> dict[str, dict]:
    """{layer: analyse_layer(...)} for one loaded run."""
    results = {}
    for name, layer in tqdm(run["layers"].items(), desc="layers", disable=not config.progress):
        target = run["targets"].layers[name]
        results[name] = analyse_layer(
            w0=layer["w0"], b=layer["b"], a=layer["a"], scaling=run["scaling"],
            delta_w=target.delta_w, sigma=target.sigma, target_basis=target.basis,
            target_values=target.singular_values, shift=layer["shift"],
            intruder_top_k=config.intruder_top_k, intruder_threshold=config.intruder_threshold)
    return results


def full_finetune_intruders(run: dict, config: SpectralAnalysisConfig) -> dict[str, dict]:
    """Intruders of the spectral teacher's weight W0 + dW (the full fine-tune) per layer."""
    return {name: intruder_dimensions(layer["w0"], layer["w0"].double()
                                      + run["targets"].layers[name].delta_w.double(),
                                      top_k=config.intruder_top_k,
                                      threshold=config.intruder_threshold)
            for name, layer in run["layers"].items()}


def random_baselines(run: dict, config: SpectralAnalysisConfig) -> dict[str, dict]:
    """Random-direction intruder baseline for each distinct (d_out, d_in) of the layers, against
    the W0 singular vectors of the first layer of that shape (seeded)."""
    generator = torch.Generator().manual_seed(config.seed)
    baselines = {}
    for layer in run["layers"].values():
        key = "x".join(map(str, layer["w0"].shape))
        if key not in baselines:
            basis = torch.linalg.svd(layer["w0"].double(), full_matrices=False)[0]
            baselines[key] = random_direction_similarity(
                basis, samples=config.random_directions, threshold=config.intruder_threshold,
                generator=generator)
    return baselines


def summarise(layers: dict[str, dict]) -> dict:
    """Means over layers (relative decomposition terms: each layer's term / its tr K)."""
    def mean(values):
        return statistics.fmean(values)

    decompositions = [v["decomposition"] for v in layers.values()]
    return {
        "layers": len(layers),
        "alignment": mean(v["alignment"] for v in layers.values()),
        "random_alignment": mean(v["random_alignment"] for v in layers.values()),
        "mean_angle_deg": mean(statistics.fmean(v["angles_deg"]) for v in layers.values()),
        "effective_rank": mean(v["effective_rank"] for v in layers.values()),
        "value_ratio": mean(statistics.fmean(a / t if t > 0 else float("nan") for a, t in
                                             zip(v["adapter_values"], v["target_values"]))
                            for v in layers.values()),
        "intruders_total": sum(v["intruders"]["count"] for v in layers.values()),
        "intruders_per_layer": mean(v["intruders"]["count"] for v in layers.values()),
        **{f"{k}_relative": mean(d[f"{k}_relative"] for d in decompositions)
           for k in ("T_I", "T_II", "T_III", "total")},
        "max_identity_residual": max(d["identity_residual"] for d in decompositions),
    }


def _runs(config: SpectralAnalysisConfig) -> dict[str, str]:
    if isinstance(config.runs, dict):
        runs = {str(k): str(v) for k, v in config.runs.items()}
    else:
        runs = {}
        for folder in config.runs:
            label = _run_config(Path(folder)).get("method") or Path(folder).name
            runs[label if label not in runs else f"{label} ({Path(folder).name})"] = str(folder)
    if not runs:
        raise ValueError("no runs given: set runs={label: <distill output folder>, ...}.")
    return runs


def run_spectral_analysis(config: SpectralAnalysisConfig) -> dict:
    """Analyse every run; write results.json, results.md and figures to ``output_dir``."""
    setup_logging(config.log_level)
    started, output = time.time(), Path(config.output_dir)
    methods, reference, baselines = {}, None, {}
    for label, folder in _runs(config).items():
        log.info("analysing %s (%s)", label, folder)
        run = load_run(folder, config.targets)
        layers = analyse_run(run, config)
        methods[label] = {"folder": folder, "method": run["method"], "scaling": run["scaling"],
                          "summary": summarise(layers), "layers": layers}
        if reference is None and config.full_finetune_reference:
            ft = full_finetune_intruders(run, config)
            reference = {"layers": ft, "intruders_total": sum(v["count"] for v in ft.values()),
                         "intruders_per_layer": statistics.fmean(v["count"]
                                                                 for v in ft.values())}
        if not baselines:
            baselines = random_baselines(run, config)
    results = {"config": asdict(config), "methods": methods,
               "full_finetune_reference": reference, "random_direction_baseline": baselines,
               "wall_time_s": round(time.time() - started, 1)}
    write_json(results, output / "results.json")
    write_markdown(results, output / "results.md")
    results["figures"] = [str(p) for p in write_figures(results, output)]
    return results
