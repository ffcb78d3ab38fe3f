"""Benchmark 3: a sweep of student runs with and without the teacher-logit cache.

A sweep of ``methods x seeds`` (3 x 2 = 6) distillation runs on one task, each run a
``DistillationTrainer`` training a fresh PEFT LoRA student (r = 8 on query/value) for one epoch:

- ``cached``: before every run, ``TeacherLogitsCache.get_or_compute`` (the first run of the
  sweep computes the teacher's logits over the training set once, with bf16 autocast, and
  stores them; the other five load them, fingerprinting the teacher and the data each time, as
  ``sadlora distill`` does); the trainer then looks the logits up by example index;
- ``live``: the reference approach: the teacher (float32) runs a forward pass on every
  training batch of every run.

Both sweeps run in this process, alternated (cached, live, live, cached, ...) over ``rounds``
repeats; a fresh, empty cache folder for each cached sweep. The ratio is live / cached sweep
wall time (medians). Task: synthetic sequence classification (random token ids, 2 labels);
teacher: a random BERT-shaped encoder (``teacher_layers`` x ``teacher_hidden``); student: a
smaller one. Synthetic spectral targets (as in step_overhead.py) feed sad_lora_align.

Sizes (``--size``): default 128 examples x 32 tokens, teacher 6 x 384, student 2 x 128, one
repeat of each sweep (~4 min on 2 shared cores; the per-run medians are the repeated runs); ``--full``: 2048 examples x 128 tokens, a RoBERTa-base-
shaped teacher (12 x 768), student 6 x 384, 3 repeats.
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
import warnings

import benchutil as bu
import torch

from sadlora.losses import AlignmentTargets, SADLoss
from sadlora.methods import resolve_method
from sadlora.student import adapted_module_names, build_student
from sadlora.teacher_cache import TeacherLogitsCache

NAME = "logit_cache"
METHODS = ["kd_lora", "sad_lora_align", "spectral_init"]
SEEDS = [0, 1]
BATCH = 16

SIZES = {
    "quick": dict(examples=32, seq=16, teacher=(2, 64), student=(1, 32), rounds=1),
    "default": dict(examples=128, seq=32, teacher=(6, 384), student=(2, 128), rounds=1),
    "full": dict(examples=2048, seq=128, teacher=(12, 768), student=(6, 384), rounds=3),
}


def _encoder(layers: int, hidden: int, vocab: int, seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(num_hidden_layers=layers, hidden_size=hidden,
                        num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                        vocab_size=vocab, max_position_embeddings=512, num_labels=2)
    return BertForSequenceClassification(config)


def make_dataset(size: dict, vocab: int, seed: int):
    """A tokenised classification set with the ``idx`` column the cache needs."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    n, seq = size["examples"], size["seq"]
    ids = torch.randint(5, vocab, (n, seq), generator=generator)
    return Dataset.from_dict({"idx": list(range(n)), "input_ids": ids.tolist(),
                              "attention_mask": [[1] * seq] * n,
                              "labels": torch.randint(0, 2, (n,), generator=generator).tolist()})


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([row[key] for row in rows]) for key in rows[0]}


def _synthetic_targets(student):
    from step_overhead import synthetic_targets

    return synthetic_targets(student, ["query", "value"], max_rank=16)


def one_run(method: str, seed: int, size: dict, dataset, teacher, vocab: int,
            teacher_signal: dict) -> None:
    """One distillation run: a fresh student, one epoch, the method's loss."""
    from transformers import TrainingArguments

    from sadlora.trainer import DistillationTrainer

    name, spec = resolve_method(method)
    base = _encoder(*size["student"], vocab=vocab, seed=100 + seed)
    targets = _synthetic_targets(base) if spec.needs_targets else None
    student = build_student(base, lora_rank=8, target_modules=["query", "value"],
                            init=spec.init, targets=targets)
    alignment = None
    if targets is not None:
        alignment = AlignmentTargets({n: targets.layers[n] for n in adapted_module_names(student)},
                                     8)
    loss = SADLoss(alignment, alpha=1.0 if spec.use_align else 0.0, beta=0.0)
    with tempfile.TemporaryDirectory() as output:
        arguments = TrainingArguments(
            output_dir=output, seed=seed, per_device_train_batch_size=BATCH,
            num_train_epochs=1, learning_rate=1e-4, report_to=[], save_strategy="no",
            logging_steps=10**6, disable_tqdm=True, remove_unused_columns=False,
            use_cpu=True, dataloader_num_workers=0)
        trainer = DistillationTrainer(model=student, args=arguments, train_dataset=dataset,
                                      data_collator=collate, sad_loss=loss,
                                      problem_type="single_label_classification",
                                      **teacher_signal)
        trainer.train()


def sweep(mode: str, size: dict, dataset, teacher, vocab: int) -> dict:
    """All methods x seeds; returns per-run seconds and the sweep total."""
    runs = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = TeacherLogitsCache(cache_dir)
        for method in METHODS:
            for seed in SEEDS:
                run_started = time.perf_counter()
                if mode == "cached":
                    table = cache.get_or_compute(teacher, dataset, collate,
                                                 settings={"bench": NAME},
                                                 autocast_dtype=torch.bfloat16,
                                                 batch_size=64, progress=False)
                    signal = {"teacher_logits": table}
                else:
                    signal = {"teacher": teacher}
                one_run(method, seed, size, dataset, teacher, vocab, signal)
                runs.append({"method": method, "seed": seed,
                             "seconds": time.perf_counter() - run_started})
    total = time.perf_counter() - started
    print(f"[{NAME}] {mode} sweep: {total:.1f}s", file=sys.stderr, flush=True)
    return {"seconds": total, "runs": runs}


def _teacher_forward_costs(teacher, dataset) -> dict:
    """One teacher pass over the dataset, float32 vs bf16 autocast (the cache's compute)."""
    from sadlora.teacher_cache import compute_teacher_logits

    costs = {}
    for label, dtype in (("float32", None), ("bf16_autocast", torch.bfloat16)):
        wall, _ = bu.timed(lambda dtype=dtype: compute_teacher_logits(
            teacher, dataset, collate, autocast_dtype=dtype, batch_size=64, progress=False))
        costs[label] = wall
    return costs


def main(argv: list[str] | None = None) -> dict:
    p = bu.parser(NAME, __doc__.split("\n")[0])
    args = p.parse_args(argv)
    machine = bu.setup(args, NAME)
    size = SIZES[args.size]
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    vocab = 8000
    teacher = _encoder(*size["teacher"], vocab=vocab, seed=args.seed).eval()
    dataset = make_dataset(size, vocab, args.seed)
    sweeps: dict[str, list[dict]] = {"cached": [], "live": []}
    for index in range(size["rounds"]):
        order = ["cached", "live"] if index % 2 == 0 else ["live", "cached"]
        for mode in order:
            sweeps[mode].append(sweep(mode, size, dataset, teacher, vocab))
    totals = {mode: [s["seconds"] for s in results] for mode, results in sweeps.items()}
    ratio = statistics.median(totals["live"]) / statistics.median(totals["cached"])
    per_run = {mode: [run["seconds"] for s in results for run in s["runs"]]
               for mode, results in sweeps.items()}
    per_run_ratio = statistics.median(per_run["live"]) / statistics.median(per_run["cached"])
    forward = _teacher_forward_costs(teacher, dataset)
    payload = {
        "benchmark": NAME, "machine": machine,
        "config": {**vars(args), "size_spec": size, "methods": METHODS, "seeds": SEEDS,
                   "batch": BATCH, "vocab": vocab},
        "sweeps": sweeps, "sweep_seconds": {m: bu.summary(v) for m, v in totals.items()},
        "teacher_pass_seconds": forward,
        "per_run_seconds": {m: bu.summary(v) for m, v in per_run.items()},
        "ratios": {"live_over_cached_sweep": ratio,
                   "live_over_cached_per_run_median": per_run_ratio,
                   "teacher_pass_float32_over_bf16": forward["float32"]
                   / forward["bf16_autocast"]},
        "targets": {"live_over_cached_sweep": bu.target(
            ratio, at_least=1.0, note="no numeric target in the issue: the cache must win")},
    }
    path = bu.write_result(args.out, payload)
    bu.print_table(f"teacher-logit cache ({len(METHODS) * len(SEEDS)} runs, "
                   f"{size['examples']} x {size['seq']} tokens)",
                   ["sweep", "seconds (median)"],
                   [[mode, statistics.median(v)] for mode, v in totals.items()])
    print(f"live / cached = {ratio:.2f}x; teacher pass float32 / bf16 = "
          f"{payload['ratios']['teacher_pass_float32_over_bf16']:.2f}x")
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
