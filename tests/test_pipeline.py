"""End to end on tiny random models: prepare-teacher -> extract -> distill -> evaluate.

BERT (sequence classification, cached teacher logits) and Llama (causal LM, live teacher,
response-token KD). Models and tokenizers are built in the test; nothing is downloaded.
"""

import json
import math

import pytest
import torch
from tiny_models import (
    save_tiny_bert,
    save_tiny_llama,
    write_instruction_jsonl,
    write_sentiment_csv,
)

from sadlora.cli import main
from sadlora.commands import (
    DistillConfig,
    EvaluateConfig,
    ExtractConfig,
    TeacherConfig,
    distill,
    evaluate,
    extract,
    prepare_teacher,
)
from sadlora.runs import DataConfig, evaluate_model, load_model, prepare_data
from sadlora.student import load_student
from sadlora.targets import load_targets
from sadlora.teacher_cache import compute_teacher_logits
from sadlora.trainer import layer_report


@pytest.fixture(scope="module")
def bert_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    options = write_sentiment_csv(root, train=256, validation=64)
    common = dict(task="custom", task_options=options, max_length=32)
    train = dict(common, batch_size=16, logging_steps=1, seed=0, progress=False)
    # Adapting the feed-forward layers too: a tiny random BERT does not learn the task
    # through query/value adapters alone in a few dozen steps.
    modules = ["query", "value", "dense"]
    save_tiny_bert(root / "base", hidden=32)
    save_tiny_bert(root / "kd_base", hidden=48, seed=1)
    teachers = {}
    for name, model in (("kd_teacher", "kd_base"), ("spectral_teacher", "base")):
        teachers[name] = prepare_teacher(TeacherConfig(
            model=str(root / model), output_dir=str(root / name), learning_rate=3e-3,
            num_train_epochs=4, **train))
    extract(ExtractConfig(spectral_teacher=str(root / "spectral_teacher"),
                          base_model=str(root / "base"), output_dir=str(root / "targets"),
                          rank=4, max_rank=16, calibration_examples=128,
                          target_modules=modules, progress=False, **common))
    runs = {}
    for method in ("kd_lora", "sad_lora_align", "spectral_init"):
        runs[method] = distill(DistillConfig(
            student_model=str(root / "base"), teacher=str(root / "kd_teacher"),
            targets=str(root / "targets"), method=method, lora_rank=4, learning_rate=2e-2,
            num_train_epochs=4, target_modules=modules, teacher_cache_dir=str(root / "cache"), teacher_bf16=False,
            monitor_every=4, output_dir=str(root / method), **train))
    return {"root": root, "teachers": teachers, "runs": runs, "common": common}


def _losses(result):
    return [entry["loss"] for entry in result["log_history"] if "loss" in entry]


def test_teachers_learn_the_task(bert_setup):
    for result in bert_setup["teachers"].values():
        assert result["metrics"]["validation"]["accuracy"] >= 0.9


def test_distillation_loss_decreases(bert_setup):
    for method, result in bert_setup["runs"].items():
        losses = _losses(result)
        assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, method


def test_logged_total_is_the_weighted_sum_of_logged_terms(bert_setup):
    for result in bert_setup["runs"].values():
        for entry in (e for e in result["log_history"] if "loss" in e):
            # logging_steps=1: each entry is one step; kd_weight = task_weight = 1.
            recomposed = (entry["kd"] + entry["task"] + entry["alpha_t"] * entry["align"]
                          + entry["beta_t"] * entry["coeff"])
            assert entry["loss"] == pytest.approx(recomposed, rel=1e-4, abs=1e-5)


def test_alignment_stays_with_sad_lora_and_not_with_kd_lora(bert_setup):
    runs = bert_setup["runs"]
    # Same spectral init, same data order: the alignment loss is what keeps B on span(U_r).
    assert runs["sad_lora_align"]["mean_alignment"] > 0.9
    assert runs["sad_lora_align"]["mean_alignment"] > runs["spectral_init"]["mean_alignment"]
    targets = load_targets(bert_setup["root"] / "targets")
    base, _ = load_model(str(bert_setup["root"] / "base"), _spec(bert_setup))
    kd_student = load_student(base, bert_setup["root"] / "kd_lora")
    kd_alignment = [layer["alignment"] for layer in layer_report(kd_student, targets).values()]
    # A gaussian-initialised adapter finds its own subspace: far from the teacher's.
    assert max(kd_alignment) < 0.5
    # The monitor callback wrote per-layer angles during training.
    lines = (bert_setup["root"] / "sad_lora_align" / "alignment.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    assert len(record["layers"]) == len(targets.layers) == 11  # 2 x (q, v, 3 dense) + pooler
    assert all(len(layer["angles_deg"]) == 4 for layer in record["layers"].values())


def _spec(setup):
    from sadlora.runs import load_raw_splits

    return load_raw_splits(DataConfig(**setup["common"]))[0]


def test_saved_adapter_reloads_and_merges_with_identical_outputs(bert_setup):
    root = bert_setup["root"]
    folder = root / "sad_lora_align"
    for name in ("adapter_config.json", "adapter_model.safetensors", "sad_config.json",
                 "metrics.json", "targets/targets.safetensors"):
        assert (folder / name).is_file(), name
    spec = _spec(bert_setup)
    base, tokenizer = load_model(str(root / "base"), spec)
    student = load_student(base, folder).eval()
    data = prepare_data(DataConfig(**bert_setup["common"]), tokenizer)
    batch = data.collate([data.splits["validation"][i] for i in range(8)])
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "idx")}
    with torch.no_grad():
        adapted = student(**inputs).logits
        merged_model = student.merge_and_unload()
        merged = merged_model(**inputs).logits
    assert not any("lora" in name for name, _ in merged_model.named_modules())
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    # The reloaded student scores what the training run reported.
    result = evaluate(EvaluateConfig(student_model=str(root / "base"), adapter=str(folder),
                                     merge=True, **bert_setup["common"]))
    reported = bert_setup["runs"]["sad_lora_align"]["metrics"]["validation"]["accuracy"]
    assert result["metrics"]["validation"]["accuracy"] == pytest.approx(reported)


def test_cached_teacher_logits_equal_live_ones(bert_setup):
    root = bert_setup["root"]
    cached = sorted((root / "cache").glob("*.safetensors"))
    assert len(cached) == 1, "three runs, one teacher and one dataset: one table"
    from safetensors.torch import load_file

    table = load_file(str(cached[0]))["logits"]
    teacher, tokenizer = load_model(str(root / "kd_teacher"), _spec(bert_setup))
    data = prepare_data(DataConfig(**bert_setup["common"]), tokenizer)
    teacher.eval()
    with torch.no_grad():
        for i in (0, 5, 77):
            row = data.splits["train"][i]
            live = teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(table[row["idx"]], live, atol=1e-5, rtol=1e-5)
    again = compute_teacher_logits(teacher, data.splits["train"], data.collate, batch_size=7,
                                   progress=False)
    torch.testing.assert_close(again, table, atol=1e-5, rtol=1e-5)


def test_cli_runs_a_config_and_rejects_unknown_keys(bert_setup, tmp_path, capsys):
    root = bert_setup["root"]
    config = tmp_path / "distill.yaml"
    config.write_text(
        f"student_model: {root / 'base'}\nteacher: {root / 'kd_teacher'}\n"
        f"targets: {root / 'targets'}\ntask: custom\nmax_length: 32\nprogress: false\n"
        f"teacher_cache_dir: {root / 'cache'}\nteacher_bf16: false\n"
        f"task_options: {json.dumps(bert_setup['common']['task_options'])}\n")
    code = main(["distill", "--config", str(config), "method=standard_kd_lora", "max_steps=2",
                 "lora_rank=4", "target_modules=[query,value,dense]", f"output_dir={tmp_path / 'out'}"])
    assert code == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["method"] == "kd_lora"
    assert main(["distill", "--config", str(config), "lora_rnak=4"]) == 2
    assert "unknown key(s) ['lora_rnak']" in capsys.readouterr().err


def test_coefficient_methods_need_a_weight(bert_setup, tmp_path):
    root = bert_setup["root"]
    with pytest.raises(ValueError, match="set beta_coeff > 0"):
        distill(DistillConfig(student_model=str(root / "base"), teacher=str(root / "kd_teacher"),
                              targets=str(root / "targets"), method="sad_lora",
                              output_dir=str(tmp_path), progress=False, **bert_setup["common"]))


def test_llama_pipeline_with_live_teacher(tmp_path):
    options = write_instruction_jsonl(tmp_path)
    common = dict(task="instruct:files", task_options=options, max_length=48)
    train = dict(common, batch_size=8, logging_steps=1, seed=0, progress=False)
    save_tiny_llama(tmp_path / "base")
    teacher = prepare_teacher(TeacherConfig(model=str(tmp_path / "base"),
                                            output_dir=str(tmp_path / "teacher"),
                                            learning_rate=3e-3, num_train_epochs=4, **train))
    perplexity = teacher["metrics"]["validation"]["response_perplexity"]
    assert math.isfinite(perplexity) and perplexity < 10  # the vocabulary has ~40 tokens
    extract(ExtractConfig(spectral_teacher=str(tmp_path / "teacher"),
                          base_model=str(tmp_path / "base"), output_dir=str(tmp_path / "targets"),
                          target_modules=["q_proj", "v_proj"], rank=4, max_rank=8,
                          calibration_examples=32, progress=False, **common))
    result = distill(DistillConfig(
        student_model=str(tmp_path / "base"), teacher=str(tmp_path / "teacher"),
        targets=str(tmp_path / "targets"), method="sad_lora_align", lora_rank=4,
        target_modules=["q_proj", "v_proj"], learning_rate=1e-2, num_train_epochs=4,
        teacher_bf16=False, output_dir=str(tmp_path / "student"), **train))
    losses = _losses(result)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert result["mean_alignment"] > 0.95  # a random rank-4 subspace of R^32: ~0.125
    base, tokenizer = load_model(str(tmp_path / "base"), None)
    data = prepare_data(DataConfig(**common), tokenizer)
    untrained = evaluate_model(base, data, "validation")["response_perplexity"]
    # Rank-4 q/v adapters on a random base: the student moves towards the teacher.
    student_perplexity = result["metrics"]["validation"]["response_perplexity"]
    assert student_perplexity < 0.85 * untrained, (student_perplexity, untrained, perplexity)
    student = load_student(base, tmp_path / "student").eval()
    ids = torch.tensor([tokenizer("sentiment of the good movie")["input_ids"]])
    with torch.no_grad():
        adapted = student(input_ids=ids).logits
        merged = student.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.assets
def test_real_minilm_on_embedded_stsb_smoke(tmp_path):
    """The packaged MiniLM and STS-B through extract + distill + evaluate, a few steps each.

    The spectral teacher is the base with its value projections nudged, so the targets are
    real-model targets without a teacher fine-tune (minutes) in CI.
    """
    from sadlora.assets import asset_path
    from sadlora.runs import load_raw_splits

    base_dir = asset_path("minilm")
    teacher_dir = tmp_path / "nudged"
    spec_config = DataConfig(task="embedded:stsb")
    teacher, tokenizer = load_model(str(base_dir), load_raw_splits(spec_config)[0])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in teacher.bert.encoder.layer:
            weight = block.attention.self.value.weight
            weight.add_(1e-2 * torch.randn(weight.shape, generator=generator))
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    data = dict(task="embedded:stsb", train_examples=32, eval_examples=32, max_length=48)
    extract(ExtractConfig(spectral_teacher=str(teacher_dir), base_model="asset:minilm",
                          target_modules=["value"], rank=4, max_rank=8,
                          calibration_examples=32, output_dir=str(tmp_path / "targets"),
                          progress=False, **data))
    result = distill(DistillConfig(
        student_model="asset:minilm", teacher=None, targets=str(tmp_path / "targets"),
        method="lora", lora_rank=4, target_modules=["value"], max_steps=3, batch_size=8,
        progress=False, output_dir=str(tmp_path / "student"), **data))
    scores = result["metrics"]["validation"]
    assert set(scores) == {"pearson", "spearman"}
    assert all(math.isfinite(v) and -1 <= v <= 1 for v in scores.values())
    # Every adapted layer is measured against the real targets (angles in [0, 90] degrees).
    assert len(result["layers"]) == 6
    assert all(0 <= a <= 90 for layer in result["layers"].values() for a in layer["angles_deg"])
    reloaded = evaluate(EvaluateConfig(adapter=str(tmp_path / "student"), merge=True, **data))
    assert reloaded["metrics"]["validation"]["spearman"] == pytest.approx(scores["spearman"],
                                                                          abs=1e-6)


