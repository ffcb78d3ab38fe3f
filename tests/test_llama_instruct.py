"""The instruction experiment end to end on a tiny random Llama (no download), plus its parts:
layer dropping, templated data with masked prompts, exact match by greedy generation."""

import dataclasses
import json
import math

import pytest
import torch
from tiny_models import save_tiny_llama

from sadlora.experiments.llama_instruct import (
    LlamaInstructConfig,
    drop_layers,
    kept_layer_indices,
    run_llama_instruct,
)
from sadlora.instruct import exact_match, load_instruction_task, tokenize_instructions
from sadlora.runs import load_model

ANSWER_WORDS = ("positive", "negative", "0", "1", "2", "3", "4", "5", "answer")


def test_kept_layer_indices():
    assert kept_layer_indices(30, "every_other") == list(range(0, 30, 2))
    assert kept_layer_indices(4, [3, 1]) == [1, 3]
    with pytest.raises(ValueError, match="outside"):
        kept_layer_indices(4, [4])
    # every 5th layer dropped (4, 9, ..., 24), never the last one
    assert kept_layer_indices(30, "drop_every:5") == [i for i in range(30)
                                                      if i not in (4, 9, 14, 19, 24)]
    assert kept_layer_indices(4, "drop_every:2") == [0, 2, 3]
    for bad in ("drop_every:1", "drop_every:x", "half"):
        with pytest.raises(ValueError, match="drop_every:N"):
            kept_layer_indices(30, bad)


def test_drop_layers_keeps_the_chosen_layers(tmp_path):
    source = save_tiny_llama(tmp_path / "base", layers=4)
    small = drop_layers(str(source), tmp_path / "small", [1, 3])
    full, _ = load_model(str(source), None)
    student, _ = load_model(str(small), None)
    assert student.config.num_hidden_layers == 2
    for new, old in ((0, 1), (1, 3)):
        torch.testing.assert_close(student.model.layers[new].mlp.up_proj.weight,
                                   full.model.layers[old].mlp.up_proj.weight)
    # The saved copy runs (KV cache indices follow the new positions) and generates.
    ids = torch.tensor([[2, 5, 6, 7]])
    assert student.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_templated_data_masks_the_prompt(tmp_path):
    data = load_instruction_task("instruct:templated", train_per_task=4, eval_per_task=2)
    assert len(data["train"]) == 8 and set(data["train"]["task"]) == {"rotten_tomatoes", "stsb"}
    assert all(r.startswith("answer: ") for r in data["train"]["response"])
    _, tokenizer = load_model(str(save_tiny_llama(tmp_path / "m", extra_words=ANSWER_WORDS)),
                              None)
    row = tokenize_instructions(data["train"], tokenizer, max_length=512)[0]
    scored = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    # Only the response (and its end-of-sequence token) is scored.
    assert tokenizer.decode(scored, skip_special_tokens=True).replace(" ", "") == \
        data["train"][0]["response"].replace(" ", "")
    with pytest.raises(ValueError, match="unknown template"):
        load_instruction_task("instruct:templated", tasks=["cola"])


def test_exact_match_counts_greedy_answers(tmp_path):
    model, tokenizer = load_model(str(save_tiny_llama(tmp_path / "m")), None)
    rows = [{"prompt": "the movie", "response": "x", "task": "a"},
            {"prompt": "the good film was", "response": "y", "task": "b"}]
    from sadlora.instruct import greedy_answers

    answers = greedy_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=2)
    rows[0]["response"] = answers[0]  # the model's own answer is an exact match
    result = exact_match(model, tokenizer, rows, max_new_tokens=2)
    assert result["by_task"]["a"] == 1.0
    assert result["exact_match"] == (1.0 if answers[1].strip() == "y" else 0.5)


def test_pipeline_end_to_end_on_tiny_llama(tmp_path):
    source = save_tiny_llama(tmp_path / "base", layers=4, hidden=32, extra_words=ANSWER_WORDS)
    config = LlamaInstructConfig(
        output_dir=str(tmp_path / "out"), base_model=str(source), kd_teacher=str(source),
        keep_layers="every_other", finetune_kd_teacher=False, train_per_task=16,
        eval_per_task=4, max_words=8, max_length=96, forgetting_texts=8,
        methods=["sad_lora_align"], lora_rank=2, learning_rate=1e-2,
        teacher_learning_rate=3e-3, num_train_epochs=2, teacher_epochs=4, batch_size=8,
        calibration_examples=16, max_rank=4, max_new_tokens=3, bf16=False, log_level="WARNING",
        kd_top_k=8)
    results = run_llama_instruct(config)
    models = results["models"]
    base, teacher = models["student_base (no adaptation)"], models["spectral_teacher (full FT)"]
    assert base["forgetting"]["perplexity_ratio"] == 1.0
    # The fully fine-tuned student architecture learns the templated responses.
    assert teacher["response_perplexity"] < 0.5 * base["response_perplexity"]
    student = models["sad_lora_align"]
    assert math.isfinite(student["generic"]["perplexity"])
    assert student["forgetting"]["perplexity_ratio"] == pytest.approx(
        student["generic"]["perplexity"] / base["generic"]["perplexity"])
    assert 0.0 <= student["exact_match"] <= 1.0
    assert student["response_perplexity"] < base["response_perplexity"]
    # Spectral init + alignment loss keep the adapters on the full-FT subspace (a random
    # rank-2 subspace of R^32 or R^16 aligns about 0.1).
    assert student["mean_alignment"] > 0.9
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["config"]["keep_layers"] == "every_other"
    distilled = json.loads((tmp_path / "out" / "students" / "sad_lora_align" / "metrics.json")
                           .read_text())
    assert distilled["config"]["kd_top_k"] == 8  # the sparse KD reached the student's loss
    student, _ = load_model(str(tmp_path / "out" / "student_base"), None)
    assert student.config.num_hidden_layers == 2
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| sad_lora_align |" in report and "ppl ratio" in report
    assert set(results["stage_seconds"]) >= {"spectral_teacher", "extract", "distill_sad_lora_align"}
    # A second call resumes: teachers, targets and students are reused, the results equal.
    again = run_llama_instruct(config)
    assert again["stage_seconds"]["distill_sad_lora_align"] == \
        results["stage_seconds"]["distill_sad_lora_align"]
    assert again["models"]["sad_lora_align"]["response_perplexity"] == pytest.approx(
        models["sad_lora_align"]["response_perplexity"], rel=1e-6)
    # A resumed call may add a method: only the new student is trained.
    grown = run_llama_instruct(dataclasses.replace(config, methods=["sad_lora_align", "lora"]))
    assert set(grown["models"]) >= {"sad_lora_align", "lora"}
    assert grown["stage_seconds"]["distill_sad_lora_align"] == \
        results["stage_seconds"]["distill_sad_lora_align"]
    assert grown["stage_seconds"]["extract"] == results["stage_seconds"]["extract"]
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['lora_rank'\]"):
        run_llama_instruct(dataclasses.replace(config, lora_rank=4, methods=["kd_lora"]))

