"""Reliability: distributed runs, faults and bad input, numerics (tiny random models only).

Bad-input cases already tested elsewhere are not repeated here: lora_rank above min(d_out, d_in)
and unmatched target modules for ``build_student`` (test_student.py), unmatched names for
calibration (test_calibration.py), a teacher of another architecture, dW = 0, NaN teacher
weights and corrupted/truncated/foreign targets for ``build_targets`` / ``load_targets``
(test_targets.py), empty and all-padding calibration batches (test_calibration.py), a
rank-deficient B in the alignment losses (test_losses.py), labels outside the label range
(test_tasks.py), unknown config keys (test_pipeline.py). The cases below check the same
mistakes end to end, through the ``extract`` / ``distill`` pipelines, and that nothing is left
behind looking complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import (
    save_tiny_bert,
    save_tiny_llama,
    write_instruction_jsonl,
    write_sentiment_csv,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from sadlora.calibration import collect_second_moments, resolve_target_modules
from sadlora.cli import main as sadlora_main
from sadlora.commands import (
    DistillConfig,
    EvaluateConfig,
    ExtractConfig,
    distill,
    evaluate,
    extract,
)
from sadlora.losses import AlignmentTargets, SADLoss
from sadlora.runs import DataConfig, load_model, prepare_data, write_json
from sadlora.targets import LayerTarget, build_targets, load_targets, save_targets
from sadlora.teacher_cache import TeacherLogitsCache, compute_teacher_logits
from sadlora.trainer import sharded_parameters

MODULES = ["query", "value"]
HIDDEN = 16
# The files whose presence says "this run finished": none may exist after a failed run.
COMPLETE_MARKERS = ("metrics.json", "adapter_model.safetensors", "targets.json",
                    "targets.safetensors")


# --------------------------------------------------------------------------------------------
# Fixtures: tiny BERTs, a task, targets
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the machine's cores are shared, and two threads contending for
    them make tiny-model steps ~50x slower; it also fixes the float summation order."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def save_perturbed(source: Path, folder: Path, *, scale: float = 0.05, seed: int = 3) -> Path:
    """A 'fine-tuned' copy of a model folder: every weight moved by seeded noise."""
    model = AutoModelForSequenceClassification.from_pretrained(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def save_edited(source: Path, folder: Path, edit) -> Path:
    """A copy of a classification model folder after ``edit(model)``."""
    model = AutoModelForSequenceClassification.from_pretrained(source)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """base / spectral teacher / KD teacher folders, a 2-label task and extracted targets."""
    root = tmp_path_factory.mktemp("reliability")
    options = write_sentiment_csv(root, train=32, validation=16)
    common = dict(task="custom", task_options=options, max_length=16)
    save_tiny_bert(root / "base", hidden=HIDDEN)
    save_tiny_bert(root / "kd_teacher", hidden=HIDDEN, seed=1)
    save_perturbed(root / "base", root / "spectral")
    extract(ExtractConfig(spectral_teacher=str(root / "spectral"), base_model=str(root / "base"),
                          output_dir=str(root / "targets"), rank=2, max_rank=4,
                          calibration_examples=16, target_modules=MODULES, progress=False,
                          **common))
    return {"root": root, "common": common}


def distill_values(setup, output_dir: Path, **overrides) -> dict:
    """A small sad_lora_align run: 32 examples, batch 4, cached teacher logits."""
    root = setup["root"]
    values = dict(student_model=str(root / "base"), teacher=str(root / "kd_teacher"),
                  targets=str(root / "targets"), method="sad_lora_align", lora_rank=2,
                  target_modules=MODULES, batch_size=4, eval_batch_size=16, learning_rate=1e-2,
                  num_train_epochs=1, logging_steps=1, monitor_every=0, progress=False,
                  teacher_bf16=False, teacher_cache_dir=str(root / "cache"),
                  output_dir=str(output_dir), **setup["common"])
    values.update(overrides)
    return values


def assert_nothing_complete(folder: Path) -> None:
    left = [p.name for p in folder.rglob("*") if p.name in COMPLETE_MARKERS] \
        if folder.exists() else []
    assert not left, f"a failed run left {left} in {folder}"


def calibration_batches(setup, count: int = 16, batch_size: int = 4) -> list[dict]:
    """Collated, padded batches of the task's first training examples (no labels)."""
    model, tokenizer = load_model(str(setup["root"] / "base"), None)
    del model
    data = prepare_data(DataConfig(**setup["common"]), tokenizer)
    rows = [data.splits["train"][i] for i in range(count)]
    batches = []
    for start in range(0, count, batch_size):
        batch = data.collate(rows[start:start + batch_size])
        batches.append({k: v for k, v in batch.items() if k not in ("labels", "idx")})
    return batches


# --------------------------------------------------------------------------------------------
# Distributed: torchrun, 2 processes, gloo on CPU
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_run(setup):
    """One torchrun launch: calibration + targets on sharded batches, then `sadlora distill`."""
    root = setup["root"]
    (root / "ddp").mkdir()
    torch.save(calibration_batches(setup), root / "batches.pt")
    values = distill_values(setup, root / "ddp_student",
                            teacher_cache_dir=str(root / "ddp_cache"))
    (root / "distill.yaml").write_text(yaml.safe_dump(values))
    worker = Path(__file__).with_name("distributed_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--standalone", str(worker), str(root)],
        env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-4000:]
    reports = [json.loads((root / "ddp" / f"report_rank{r}.json").read_text()) for r in (0, 1)]
    return {"root": root, "reports": reports, "values": values}


def test_ddp_second_moments_equal_the_single_process_ones(setup, ddp_run):
    """S and n all-reduced over two ranks = one process streaming every batch."""
    base = AutoModelForSequenceClassification.from_pretrained(setup["root"] / "base")
    names = resolve_target_modules(base, MODULES)
    single = collect_second_moments(base, torch.load(setup["root"] / "batches.pt"), names,
                                    progress=False)
    reduced = torch.load(ddp_run["root"] / "ddp" / "moments.pt")
    assert set(reduced) == set(names)
    for name in names:
        total, count = reduced[name]
        assert count == single[name].count
        torch.testing.assert_close(total, single[name].sum, rtol=1e-6, atol=1e-6)


def test_ddp_targets_are_computed_once_and_identical_on_both_ranks(setup, ddp_run):
    reports = ddp_run["reports"]
    # Rank 0 eigendecomposes each of the 4 layers; rank 1 receives the broadcast.
    assert [r["eigendecompositions"] for r in reports] == [4, 0]
    ranks = [torch.load(ddp_run["root"] / "ddp" / f"targets_rank{r}.pt") for r in (0, 1)]
    assert set(ranks[0]) == set(ranks[1]) and len(ranks[0]) == 4
    for name, tensors in ranks[0].items():
        for mine, theirs in zip(tensors, ranks[1][name]):
            assert torch.equal(mine, theirs), name
    base = AutoModelForSequenceClassification.from_pretrained(setup["root"] / "base")
    teacher = AutoModelForSequenceClassification.from_pretrained(setup["root"] / "spectral")
    single = build_targets(teacher, base, torch.load(setup["root"] / "batches.pt"), MODULES,
                           rank=2, max_rank=4, progress=False)
    for name, target in single.layers.items():
        torch.testing.assert_close(ranks[0][name][1], target.singular_values, rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(ranks[0][name][0], target.basis, rtol=1e-4, atol=1e-5)


def test_ddp_distill_completes_and_only_rank_zero_writes(ddp_run):
    reports = ddp_run["reports"]
    assert [r["exit_code"] for r in reports] == [0, 0]
    assert reports[1]["writes"] == [], "rank 1 wrote files of the run"
    assert reports[0]["writes"], "the audit hook saw no write at all: it is not working"
    output = Path(ddp_run["values"]["output_dir"])
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.json",
                 "sad_config.json", "targets/targets.json"):
        assert (output / name).is_file(), name
    history = json.loads((output / "metrics.json").read_text())["log_history"]
    # 32 examples, batch 4 per rank, 2 ranks: 4 optimizer steps (8 in one process).
    assert max(entry["step"] for entry in history) == 4


def test_ddp_saved_adapter_loads_and_scores_what_was_reported(setup, ddp_run):
    output = Path(ddp_run["values"]["output_dir"])
    reported = json.loads((output / "metrics.json").read_text())["metrics"]["validation"]
    reloaded = evaluate(EvaluateConfig(student_model=str(setup["root"] / "base"),
                                       adapter=str(output), **setup["common"]))
    assert reloaded["metrics"]["validation"]["accuracy"] == pytest.approx(reported["accuracy"])


def fake_trainer(fsdp=None, zero_stage=None):
    """Just the accelerator state that ``sharded_parameters`` reads."""
    deepspeed = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
    state = SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=deepspeed)
    return SimpleNamespace(accelerator=SimpleNamespace(state=state))


def test_parameter_sharding_is_detected_for_fsdp_and_zero3_only():
    """FSDP / ZeRO-3 shard the LoRA factors (not supported with spectral losses yet);
    DDP and ZeRO-1/2 keep whole parameters on every rank."""
    assert sharded_parameters(fake_trainer(fsdp=object())) == "FSDP"
    assert sharded_parameters(fake_trainer(zero_stage=3)) == "DeepSpeed ZeRO-3"
    assert sharded_parameters(fake_trainer(zero_stage=2)) is None
    assert sharded_parameters(fake_trainer()) is None


# --------------------------------------------------------------------------------------------
# Faults: SIGKILL and resume, atomic writes, corrupted caches
# --------------------------------------------------------------------------------------------


def complete_checkpoints(folder: Path) -> list[Path]:
    """checkpoint-N folders whose trainer_state.json (written last) is readable JSON."""
    complete = []
    for checkpoint in folder.glob("checkpoint-*"):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        complete.append(checkpoint)
    return complete


def kill_after_first_checkpoint(command: list[str], folder: Path, env: dict) -> int:
    """Start ``command``, SIGKILL it as soon as a checkpoint folder is complete."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while process.poll() is None and time.time() < deadline:
            if complete_checkpoints(folder):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        return process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_killed_distillation_resumes_to_the_same_adapter(setup, tmp_path):
    """SIGKILL after a checkpoint, rerun of the same command: same adapter as no kill."""
    output = tmp_path / "killed"
    values = distill_values(setup, output, max_steps=30, save_steps=5, resume=True,
                            monitor_every=5)
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump(values))
    argv = ["distill", "--config", str(config)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = kill_after_first_checkpoint([sys.executable, "-m", "sadlora.cli", *argv], output, env)
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (output / "metrics.json").exists()
    kept = max(complete_checkpoints(output), key=lambda p: int(p.name.split("-")[1]))
    state_time = (kept / "trainer_state.json").stat().st_mtime_ns
    # A checkpoint cut short while saving (no trainer_state.json yet) must be skipped.
    partial = output / "checkpoint-999"
    partial.mkdir()
    shutil.copy(kept / "adapter_model.safetensors", partial)

    assert sadlora_main(argv) == 0  # the same command again
    resumed = adapter_tensors(output)
    # Resumed, not restarted: a fresh run would have rewritten the kept checkpoint.
    assert (kept / "trainer_state.json").stat().st_mtime_ns == state_time
    steps = [json.loads(line)["step"] for line in (output / "alignment.jsonl").open()]
    assert steps == list(range(5, 31, 5)), "monitor records duplicated or lost by the resume"

    # Checkpoints consume no randomness: the reference skips them to save time.
    reference_values = dict(values, output_dir=str(tmp_path / "uninterrupted"), resume=False,
                            save_steps=0)
    distill(DistillConfig(**reference_values))
    reference = adapter_tensors(tmp_path / "uninterrupted")
    assert set(resumed) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


def failing_replace(*args, **kwargs):
    raise OSError("disk full (simulated)")


def test_failed_json_write_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = write_json(tmp_path / "metrics.json", {"run": 1})
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"run": 2})
    assert json.loads(path.read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_failed_targets_write_keeps_the_previous_targets(setup, tmp_path, monkeypatch):
    folder = shutil.copytree(setup["root"] / "targets", tmp_path / "targets")
    before = load_targets(folder)
    changed = load_targets(folder)
    for target in changed.layers.values():
        target.singular_values = target.singular_values * 2
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_targets(changed, folder)
    monkeypatch.undo()
    after = load_targets(folder)  # checksum verified: still the old, complete targets
    for name, target in before.layers.items():
        assert torch.equal(after.layers[name].singular_values, target.singular_values)
    assert sorted(p.name for p in folder.iterdir()) == ["targets.json", "targets.safetensors"]


class _Scorer(torch.nn.Module):
    """A stand-in teacher: fixed logits computed from the input ids (optionally NaN)."""

    def __init__(self, poison: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        self.poison = poison

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        score = input_ids.float().mean(-1, keepdim=True) * self.weight
        if self.poison:
            score = score / 0.0 * 0.0  # NaN
        return type("Output", (), {"logits": score})()


def tokenised_train(setup):
    _, tokenizer = load_model(str(setup["root"] / "base"), None)
    return prepare_data(DataConfig(**setup["common"]), tokenizer)


def test_corrupted_teacher_cache_is_detected_and_rebuilt(setup, tmp_path, caplog):
    data = tokenised_train(setup)
    cache, teacher = TeacherLogitsCache(tmp_path), _Scorer()
    table = cache.get_or_compute(teacher, data.splits["train"], data.collate, progress=False)
    (stored,) = tmp_path.glob("*.safetensors")
    for damage in (lambda raw: raw[: len(raw) // 2],  # truncated
                   lambda raw: raw[:-8] + bytes(8)):  # last logits overwritten
        stored.write_bytes(damage(stored.read_bytes()))
        with caplog.at_level(logging.WARNING, logger="sadlora.teacher_cache"):
            again = cache.get_or_compute(teacher, data.splits["train"], data.collate,
                                         progress=False)
        assert "corrupted" in caplog.text
        caplog.clear()
        assert torch.equal(again, table)
        assert torch.equal(cache.load(stored.stem), table), "the rebuilt file is not valid"
    assert [p.name for p in tmp_path.iterdir()] == [stored.name]  # no temporaries


def test_teacher_cache_is_written_by_rank_zero_only(setup, tmp_path, monkeypatch):
    data = tokenised_train(setup)
    monkeypatch.setenv("RANK", "1")
    table = TeacherLogitsCache(tmp_path).get_or_compute(_Scorer(), data.splits["train"],
                                                        data.collate, progress=False)
    assert table.shape == (32, 2) and list(tmp_path.iterdir()) == []


def test_teacher_with_nan_logits_is_rejected(setup):
    data = tokenised_train(setup)
    with pytest.raises(ValueError, match="NaN or Inf logits"):
        compute_teacher_logits(_Scorer(poison=True), data.splits["train"], data.collate,
                               progress=False)


# --------------------------------------------------------------------------------------------
# Bad input through the pipelines
# --------------------------------------------------------------------------------------------


def poison_layer_norm(model) -> None:
    """NaN in a weight no adapter touches: every activation after the embeddings is NaN."""
    model.bert.embeddings.LayerNorm.weight[0] = float("nan")


@pytest.fixture(scope="module")
def bad_inputs(setup):
    """Folders of broken models and targets, built once."""
    root = setup["root"]
    bad = root / "bad"
    save_tiny_bert(bad / "wide_base", hidden=24)
    save_perturbed(bad / "wide_base", bad / "wide_spectral")
    extract(ExtractConfig(spectral_teacher=str(bad / "wide_spectral"),
                          base_model=str(bad / "wide_base"), output_dir=str(bad / "wide_targets"),
                          rank=2, max_rank=4, calibration_examples=8, target_modules=MODULES,
                          progress=False, **setup["common"]))
    truncated = shutil.copytree(root / "targets", bad / "truncated_targets")
    raw = (truncated / "targets.safetensors").read_bytes()
    (truncated / "targets.safetensors").write_bytes(raw[: len(raw) // 2])
    save_edited(root / "base", bad / "nan_base", poison_layer_norm)
    three = AutoModelForSequenceClassification.from_pretrained(root / "kd_teacher", num_labels=3,
                                                               ignore_mismatched_sizes=True)
    three.save_pretrained(bad / "three_label_teacher")
    AutoTokenizer.from_pretrained(root / "kd_teacher").save_pretrained(bad / "three_label_teacher")
    return bad


DISTILL_ERRORS = {
    "rank above min(d_out, d_in)": (dict(lora_rank=32), r"lora_rank=32 exceeds min\(d_out, d_in\)"),
    "target modules match nothing": (
        dict(target_modules=["q_proj"]), r"\['q_proj'\] match no linear layer.*'query'"),
    "unknown method": (dict(method="sad_lora_typo"), r"unknown method .*valid methods.*kd_lora"),
    "targets of another model": (
        dict(targets="{bad}/wide_targets"), r"\(16, 16\).*made for \(24, 24\).*wrong model"),
    "truncated targets": (dict(targets="{bad}/truncated_targets"),
                          r"truncated or corrupted.*rebuild the targets"),
    "NaN in the student's weights": (
        dict(student_model="{bad}/nan_base"),
        r"student_model .*NaN or Inf values in parameter 'bert.embeddings.LayerNorm.weight'"),
    "teacher label count": (dict(teacher="{bad}/three_label_teacher"),
                            r"has 3 labels but task 'custom' has 2.*prepare-teacher"),
}


@pytest.mark.parametrize("case", DISTILL_ERRORS)
def test_distill_rejects_bad_input_before_writing_anything(case, setup, bad_inputs, tmp_path):
    overrides, message = DISTILL_ERRORS[case]
    overrides = {k: v.format(bad=bad_inputs) if isinstance(v, str) else v
                 for k, v in overrides.items()}
    output = tmp_path / "student"
    with pytest.raises(ValueError, match=message):
        distill(DistillConfig(**distill_values(setup, output, **overrides)))
    assert_nothing_complete(output)


EXTRACT_ERRORS = {
    "teacher shapes differ": (dict(spectral_teacher="{bad}/wide_spectral"),
                              r"shape \(24, 24\) in the teacher but \(16, 16\) in the base"),
    "zero task update": (dict(spectral_teacher="{root}/base"), r"task update of .* is zero"),
    "empty calibration set": (dict(calibration_examples=0), r"yielded no batches"),
    "NaN activations": (dict(base_model="{bad}/nan_base", spectral_teacher="{root}/spectral"),
                        r"contained NaN or Inf during calibration"),
    "rank above d_out": (dict(rank=32, max_rank=64), r"rank=32 must be in \[1, min"),
}


@pytest.mark.parametrize("case", EXTRACT_ERRORS)
def test_extract_rejects_bad_input_before_writing_anything(case, setup, bad_inputs, tmp_path):
    overrides, message = EXTRACT_ERRORS[case]
    root = setup["root"]
    values = dict(spectral_teacher=str(root / "spectral"), base_model=str(root / "base"),
                  output_dir=str(tmp_path / "targets"), rank=2, max_rank=4,
                  calibration_examples=8, target_modules=MODULES, progress=False,
                  **setup["common"])
    values.update({k: v.format(bad=bad_inputs, root=root) if isinstance(v, str) else v
                   for k, v in overrides.items()})
    with pytest.raises(ValueError, match=message):
        extract(ExtractConfig(**values))
    assert_nothing_complete(tmp_path / "targets")


def test_live_teacher_with_another_vocabulary_is_rejected(tmp_path):
    options = write_instruction_jsonl(tmp_path, train=8, validation=4)
    save_tiny_llama(tmp_path / "base")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    teacher.resize_token_embeddings(teacher.config.vocab_size + 8)
    teacher.save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(tmp_path / "base").save_pretrained(tmp_path / "teacher")
    config = DistillConfig(student_model=str(tmp_path / "base"), teacher=str(tmp_path / "teacher"),
                           targets=None, method="kd_lora", lora_rank=2,
                           target_modules=["q_proj"], task="instruct:files",
                           task_options=options, max_length=32, progress=False,
                           output_dir=str(tmp_path / "student"))
    with pytest.raises(ValueError, match=r"vocabulary of \d+ tokens.*one tokenizer"):
        distill(config)
    assert_nothing_complete(tmp_path / "student")


def test_diverging_run_stops_with_a_clear_error(setup, tmp_path):
    """A loss that turns NaN/Inf stops training at the next log, naming the terms."""
    values = distill_values(setup, tmp_path / "student", method="kd_lora", targets=None,
                            learning_rate=1e30, max_grad_norm=0.0)
    with pytest.raises(ValueError, match=r"non-finite training loss at optimizer step \d+"):
        distill(DistillConfig(**values))
    assert_nothing_complete(tmp_path / "student")


# --------------------------------------------------------------------------------------------
# Numerics: bf16 autocast, tied singular values, rank-deficient B
# --------------------------------------------------------------------------------------------


def tied_targets(d_out: int = 8, d_in: int = 6, k: int = 4) -> AlignmentTargets:
    """Two layers whose target singular values are all equal (a flat, degenerate spectrum)."""
    generator = torch.Generator().manual_seed(0)
    layers = {}
    for name in ("l0.q", "l0.v"):
        basis = torch.linalg.qr(torch.randn(d_out, k, generator=generator))[0]
        layers[name] = LayerTarget(basis=basis, singular_values=torch.ones(k),
                                   total_energy=torch.tensor(float(k)), rank=2, gap=1.0,
                                   sigma=torch.eye(d_in))
    return AlignmentTargets(layers, 2)


def sad_loss_and_gradients(targets, adapters, dtype: torch.dtype):
    """Total SAD loss (KD + task + align + coeff) under bf16 autocast, and its gradients."""
    leaves = {n: (b.to(dtype).requires_grad_(), a.to(dtype).requires_grad_())
              for n, (b, a) in adapters.items()}
    loss = SADLoss(targets, alpha=1.0, beta=1.0, schedule="fixed")
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(4, 2, generator=generator).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = loss(leaves, student_logits=student, teacher_logits=torch.randn(4, 2),
                     labels=torch.tensor([0, 1, 1, 0]), problem_type="single_label_classification",
                     step=0)
    terms["total"].backward()
    gradients = [t.grad for pair in leaves.values() for t in pair] + [student.grad]
    return terms, gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_spectra_under_bf16_autocast_give_finite_float32_losses(dtype):
    targets = tied_targets()
    # B = U_2 and A with orthonormal rows: the adapter's singular values are tied too.
    adapters = {}
    for name in ("l0.q", "l0.v"):
        basis = targets.basis(targets.groups[0])[targets.groups[0].names.index(name)]
        adapters[name] = (basis[:, :2].clone(), torch.eye(2, 6) * 0.5)
    terms, gradients = sad_loss_and_gradients(targets, adapters, dtype)
    for name in ("total", "kd", "task", "align", "coeff"):
        assert terms[name].dtype == torch.float32 and torch.isfinite(terms[name]), name
    assert float(terms["coeff"].detach()) > 0  # 0.5 against targets of 1: a real, non-trivial term
    assert all(g is not None and torch.isfinite(g).all() for g in gradients)


def test_rank_deficient_b_keeps_coefficient_and_total_loss_finite():
    targets = tied_targets()
    column = torch.randn(8, 1, generator=torch.Generator().manual_seed(2))
    deficient = torch.cat([column, column], 1)  # rank 1 instead of 2
    adapters = {"l0.q": (deficient, torch.randn(2, 6)), "l0.v": (torch.zeros(8, 2),
                                                                 torch.zeros(2, 6))}
    terms, gradients = sad_loss_and_gradients(targets, adapters, torch.float32)
    assert all(torch.isfinite(terms[n]) for n in ("total", "align", "coeff"))
    assert all(torch.isfinite(g).all() for g in gradients)
