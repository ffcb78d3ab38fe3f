"""The distillation grid on tiny random BERTs: resumable, shared teachers, aggregate report."""

import json

import pytest
from tiny_models import save_tiny_bert, write_sentiment_csv

from sadlora.experiments import grid as grid_module
from sadlora.experiments.grid import GridConfig, distill_config, run_folder, run_grid
from sadlora.experiments.grid_report import aggregate


@pytest.fixture()
def config(tmp_path):
    options = write_sentiment_csv(tmp_path, train=64, validation=32)
    save_tiny_bert(tmp_path / "base", hidden=32)
    save_tiny_bert(tmp_path / "kd_base", hidden=48, seed=1)
    return GridConfig(
        output_dir=str(tmp_path / "grid"), tasks=["custom"], task_options={"custom": options},
        ranks=[2, 4], methods=["kd_lora", "sad_lora_align"], seeds=[0],
        kd_teacher_model=str(tmp_path / "kd_base"), student_model=str(tmp_path / "base"),
        target_modules=["query", "value"], max_length=32, eval_splits=["validation"],
        teacher_epochs=1, student_epochs=1, teacher_batch_size=16, batch_size=16,
        kd_teacher_lr=1e-3, spectral_teacher_lr=1e-3, student_lr=1e-2, calibration_examples=32,
        max_rank=8, bf16=False, progress=False, monitor_every=0, forgetting_pairs=0)


def test_interrupted_grid_resumes_and_skips_complete_runs(config, monkeypatch):
    config.forgetting_pairs = 12
    real_distill = grid_module.distill
    calls = []

    def interrupted(run):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during the third run")
        calls.append(run.output_dir)
        return real_distill(run)

    monkeypatch.setattr(grid_module, "distill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_grid(config)
    assert len(calls) == 2
    # A run that died after writing some files but before metrics.json is incomplete.
    third = run_folder(config, "custom", "sad_lora_align", 2, 0)
    third.mkdir(parents=True)
    (third / "adapter_config.json").write_text("{}")

    calls.clear()
    teacher_stamp = (config_path := run_folder(config, "custom", "kd_lora", 2, 0)
                     / "metrics.json").stat().st_mtime_ns
    report = run_grid(config)
    # Only the two runs that had not completed were trained again; the rest was read back.
    assert sorted(calls) == sorted(str(run_folder(config, "custom", "sad_lora_align", r, 0))
                                   for r in (2, 4))
    assert config_path.stat().st_mtime_ns == teacher_stamp
    assert len(report["runs"]) == 4 and len(report["teachers"]) == 2
    forgetting = run_folder(config, "custom", "kd_lora", 4, 0) / "forgetting.json"
    measured = json.loads(forgetting.read_text())
    assert measured["pairs"] == 12
    assert measured["spearman_drop"] == pytest.approx(
        measured["base_spearman"] - measured["spearman"], abs=1e-12)
    assert 0.0 < measured["embedding_cosine_to_base"] < 1.0 - 1e-6  # the student moved
    stamp = forgetting.stat().st_mtime_ns
    calls.clear()
    run_grid(config)
    assert calls == []  # everything complete: nothing runs
    assert forgetting.stat().st_mtime_ns == stamp  # measured once per run
    assert all(r["forgetting"]["pairs"] == 12 for r in report["runs"])

    folder = config.output_dir
    markdown = (folder and open(f"{folder}/results.md").read())
    assert "kd_teacher" in markdown and "sad_lora_align" in markdown
    assert "forgetting Δρ" in markdown
    results = json.loads(open(f"{folder}/results.json").read())
    assert {row["rank"] for row in results["rows"]} == {2, 4}
    # Teacher logits computed once for the task and reused by every KD run.
    assert len(list((grid_module.Path(folder) / "teacher_logits").glob("*.safetensors"))) == 1
    # Spectral-init + alignment runs start on the teacher's subspace; KD-LoRA does not.
    by_method = {(r["method"], r["rank"]): r["mean_alignment"] for r in report["runs"]}
    assert by_method[("sad_lora_align", 4)] > 0.8
    # KD-LoRA is measured against the same targets without training on them: far from them.
    assert by_method[("kd_lora", 4)] < 0.5


def test_variants_change_only_their_own_fields(config):
    config.variants = {"alpha_0.1": {"method": "sad_lora_align", "alpha_align": 0.1},
                       "energy": {"method": "sad_lora_align", "align_kind": "energy"}}
    reference = vars(distill_config(config, "custom", "sad_lora_align",
                                    {"method": "sad_lora_align"}, 4, 0))
    for name, overrides in config.variants.items():
        variant = vars(distill_config(config, "custom", name, overrides, 4, 0))
        changed = {k for k in reference if reference[k] != variant[k]}
        assert changed == set(overrides) - {"method"} | {"output_dir"}, name


def test_unknown_variant_key_is_rejected(config):
    config.variants = {"bad": {"method": "sad_lora_align", "alpha_algn": 0.1}}
    with pytest.raises(ValueError, match="alpha_algn"):
        grid_module.variant_configs(config)
    config.variants = {"bad": {"method": "sad_lora_typo"}}
    with pytest.raises(ValueError, match="unknown method 'sad_lora_typo'"):
        grid_module.variant_configs(config)


def test_aggregate_mean_and_sample_std_over_seeds():
    runs = [{"task": "t", "variant": "v", "method": "kd_lora", "rank": 8, "seed": s,
             "metrics": {"validation": {"accuracy": a}}, "primary_metric": "accuracy", "mean_alignment": None, "seconds": 1.0}
            for s, a in enumerate([0.8, 0.9, 1.0])]
    (row,) = aggregate(runs)
    stat = row["metrics"]["validation"]["accuracy"]
    assert stat["mean"] == pytest.approx(0.9) and stat["std"] == pytest.approx(0.1)
    assert stat["n"] == 3 and row["seeds"] == [0, 1, 2]


def test_rank_column_shows_per_layer_ranks_from_the_targets():
    from sadlora.experiments.grid_report import render_markdown

    layer_ranks = {"reference": {"q": 8, "v": 8}, "energy_eps": {"a": 2, "b": 14, "c": 3, "d": 7},
                   "written_before_layer_ranks": None}
    runs = [{"task": "t", "variant": variant, "method": "sad_lora_align", "rank": 8, "seed": seed,
             "metrics": {"validation": {"accuracy": 0.8}}, "primary_metric": "accuracy",
             "mean_alignment": 0.9, "seconds": 1.0, "layer_ranks": ranks}
            for variant, ranks in layer_ranks.items() for seed in (0, 1)]
    del runs[-1]["layer_ranks"]  # a metrics.json of an older run has no such key
    rows = {row["variant"]: row for row in aggregate(runs)}
    assert rows["energy_eps"]["layer_ranks"] == {"mean": 6.5, "min": 2, "max": 14}
    markdown = render_markdown([], list(rows.values()), ["validation"])
    assert "| reference | 8 | 2 |" in markdown
    assert "| energy_eps | 6.5 (2-14) | 2 |" in markdown
    assert "| written_before_layer_ranks | 8 | 2 |" in markdown


def test_changed_settings_are_not_silently_reused(config):
    config.methods = ["lora"]
    config.ranks = [2]
    run_grid(config)
    config.student_lr = 5e-3
    with pytest.raises(ValueError, match=r"learning_rate: 0.01 -> 0.005"):
        run_grid(config)


def test_each_ablation_changes_only_the_field_it_names():
    from pathlib import Path

    from sadlora.config import load_config
    from sadlora.experiments.grid import extract_config

    root = Path(__file__).resolve().parents[1]
    config = load_config(GridConfig, root / "configs" / "exp_ablations.yaml")
    task = config.tasks[0]
    variants = grid_module.variant_configs(config)
    assert len(config.variants) >= 10
    for name, overrides in config.variants.items():
        reference = vars(distill_config(config, task, overrides["method"],
                                        {"method": overrides["method"]}, 8, 0))
        variant = vars(distill_config(config, task, name, variants[name], 8, 0))
        changed = {k for k in reference if reference[k] != variant[k]} - {"output_dir"}
        assert changed == set(overrides) - {"method", "extract"}, name
        if "extract" in overrides:
            default, ablated = (vars(extract_config(config, task, o))
                                for o in (None, overrides["extract"]))
            changed = {k for k in default if default[k] != ablated[k]} - {"output_dir"}
            assert changed == set(overrides["extract"]), name
