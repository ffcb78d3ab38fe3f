"""The PEFT LoRA student: initialisers, live factors, the trainable head, save/load/merge.

Tiny random transformers built from configs (no downloads); targets built directly from random
orthonormal bases, independent of the calibration code.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from sadlora.student import (
    INITIALISERS,
    adapted_module_names,
    build_student,
    load_student,
    lora_factors,
    lora_scaling,
    save_student,
)
from sadlora.targets import LayerTarget, SpectralTargets

RANK = 4


# --------------------------------------------------------------------------------------------
# Tiny models and targets
# --------------------------------------------------------------------------------------------


def tiny_bert(num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(0)  # same weights on every call: a "fresh base" equals the original
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@dataclass
class Case:
    """One architecture under test."""

    make: Callable[[], torch.nn.Module]
    target_modules: list[str]
    head: str | None  # attribute of the task head that must be trained and saved


CASES = {
    "bert": Case(tiny_bert, ["query", "value"], "classifier"),
    "llama": Case(tiny_llama, ["q_proj", "v_proj"], None),
}


def inputs() -> torch.Tensor:
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs()).logits


def linear_names(model: torch.nn.Module, suffixes: list[str]) -> dict[str, torch.nn.Linear]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in suffixes
    }


def make_targets(
    model: torch.nn.Module, suffixes: list[str], k: int = 6, delta_w: bool = False, seed: int = 2
) -> SpectralTargets:
    """A target per matching Linear: random orthonormal (d_out, k) basis, decreasing spectrum."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in linear_names(model, suffixes).items():
        basis, _ = torch.linalg.qr(torch.randn(m.out_features, k, generator=gen))
        sv = torch.sort(torch.rand(k, generator=gen) + 0.1, descending=True).values
        layers[name] = LayerTarget(
            basis=basis.contiguous(),
            singular_values=sv,
            total_energy=(sv**2).sum() * 1.5,
            rank=k,
            gap=float(sv[k - 1] / sv[k - 2]) if k > 1 else float("inf"),
            delta_w=0.1 * torch.randn(m.out_features, m.in_features, generator=gen)
            if delta_w
            else None,
        )
    return SpectralTargets(layers=layers, metadata={"test": True})


def has_lora(model: torch.nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


def perturb(model: PeftModel, head: str | None) -> None:
    """Move the adapter (and head) away from init, as training would."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for b, a in lora_factors(model).values():
            b.add_(0.1 * torch.randn(b.shape, generator=gen))
            a.add_(0.1 * torch.randn(a.shape, generator=gen))
        if head is not None:
            for p in getattr(model.base_model.model, head).parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen))


# --------------------------------------------------------------------------------------------
# Initialisers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", CASES)
def test_spectral_init_sets_basis_keeps_output_and_factors_are_live(arch):
    case = CASES[arch]
    base = case.make()
    before = logits(base)
    targets = make_targets(base, case.target_modules)

    student = build_student(
        base, lora_rank=RANK, target_modules=case.target_modules, init="spectral", targets=targets
    ).eval()

    factors = lora_factors(student)
    assert sorted(factors) == sorted(targets.layers) == sorted(adapted_module_names(student))
    for name, (b, a) in factors.items():
        assert torch.equal(b, targets.layers[name].basis[:, :RANK])
        assert torch.equal(a, torch.zeros_like(a))
    # A = 0: the adapter adds exactly zero, and the head is the base's head.
    torch.testing.assert_close(logits(student), before, atol=1e-6, rtol=0)

    # The factors are the parameters themselves: a loss on them and on the output reaches them.
    params = {id(p) for p in student.parameters() if p.requires_grad}
    assert all(id(b) in params and id(a) in params for b, a in factors.values())
    b0, a0 = next(iter(factors.values()))
    loss = student(input_ids=inputs()).logits.square().sum() + (b0 - 1.0).square().sum()
    loss.backward()
    assert b0.grad is not None and b0.grad.abs().sum() > 0
    assert a0.grad is not None and a0.grad.abs().sum() > 0  # through B != 0 from the output


def test_spectral_full_gives_projected_teacher_update():
    base = tiny_bert()
    targets = make_targets(base, ["query", "value"], delta_w=True)
    student = build_student(
        base, lora_rank=RANK, lora_alpha=16, target_modules=["query", "value"],
        init="spectral_full", targets=targets,
    )
    s = lora_scaling(student)
    assert s == 16 / RANK
    for name, (b, a) in lora_factors(student).items():
        t = targets.layers[name]
        u = t.basis[:, :RANK].double()
        expected = (u @ u.T @ t.delta_w.double()).float()
        assert torch.equal(b, t.basis[:, :RANK])
        torch.testing.assert_close(s * b.detach() @ a.detach(), expected, atol=1e-6, rtol=0)


def test_gaussian_init_is_peft_default():
    base = tiny_bert()
    before = logits(base)
    student = build_student(base, lora_rank=RANK, target_modules=["query", "value"]).eval()
    for b, a in lora_factors(student).values():
        assert torch.equal(b, torch.zeros_like(b))
        assert a.abs().sum() > 0
    torch.testing.assert_close(logits(student), before, atol=1e-6, rtol=0)


def test_pissa_init_keeps_output_and_reloads(tmp_path):
    base = tiny_bert()
    w0 = base.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    before = logits(base)
    student = build_student(base, lora_rank=RANK, target_modules=["query", "value"], init="pissa")
    student.eval()
    b, a = lora_factors(student)["bert.encoder.layer.0.attention.self.query"]
    residual = student.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    # Balanced split of the top-r SVD; the base keeps only the residual.
    torch.testing.assert_close(residual + lora_scaling(student) * b @ a, w0, atol=1e-5, rtol=0)
    assert not torch.allclose(residual, w0)
    torch.testing.assert_close(logits(student), before, atol=1e-5, rtol=0)

    # A fresh base re-runs the (deterministic) PiSSA SVD on load: same trained student.
    perturb(student, "classifier")
    after = logits(student)
    save_student(student, tmp_path)
    torch.testing.assert_close(logits(load_student(tiny_bert(), tmp_path)), after, atol=1e-6, rtol=0)


def test_lora_alpha_defaults_to_rank():
    student = build_student(tiny_bert(), lora_rank=RANK, target_modules=["query"])
    assert lora_scaling(student) == 1.0
    assert student.peft_config["default"].lora_alpha == RANK


# --------------------------------------------------------------------------------------------
# Task head, save / load / merge
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", CASES)
def test_save_load_and_merge_reproduce_logits(arch, tmp_path):
    case = CASES[arch]
    base = case.make()
    student = build_student(
        base, lora_rank=RANK, target_modules=case.target_modules, init="spectral",
        targets=make_targets(base, case.target_modules),
    ).eval()
    expected_task = "SEQ_CLS" if case.head else "CAUSAL_LM"
    assert student.peft_config["default"].task_type == expected_task

    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    if case.head is not None:
        head_params = [n for n in trainable if f".{case.head}." in n]
        assert head_params, f"task head {case.head!r} is not trainable: {trainable}"
    # Trainable: the adapters and the head (for BERT also its pooler, see the pooler test).
    assert all("lora_" in n or (case.head and f".{case.head}." in n) or ".pooler." in n
               for n in trainable)

    perturb(student, case.head)
    after = logits(student)
    save_student(student, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    saved = load_file(tmp_path / "adapter_model.safetensors")
    if case.head is not None:
        assert any(f".{case.head}.weight" in k for k in saved), sorted(saved)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["peft_type"] == "LORA"

    reloaded = load_student(case.make(), tmp_path)
    torch.testing.assert_close(logits(reloaded), after, atol=1e-6, rtol=0)

    merged = reloaded.merge_and_unload()
    assert not isinstance(merged, PeftModel) and not has_lora(merged)
    assert type(merged) is type(case.make())
    torch.testing.assert_close(logits(merged), after, atol=1e-5, rtol=0)


def test_all_linear_adapts_every_linear_but_the_head():
    base = tiny_bert()
    expected = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    student = build_student(base, lora_rank=RANK, target_modules="all-linear")
    assert adapted_module_names(student) == [n for n in expected if n != "classifier"]


def test_regression_head_is_seq_cls_and_trainable():
    student = build_student(tiny_bert(num_labels=1), lora_rank=RANK, target_modules=["query"])
    assert student.peft_config["default"].task_type == "SEQ_CLS"
    assert student.base_model.model.classifier.weight.requires_grad


def test_multi_part_head_is_trained_too():
    """DistilBERT's head is pre_classifier + classifier; PEFT alone only knows 'classifier'."""
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=2
    )
    student = build_student(
        DistilBertForSequenceClassification(config), lora_rank=RANK, target_modules=["q_lin"]
    )
    saved = student.peft_config["default"].modules_to_save
    assert "pre_classifier" in saved and len(saved) == len(set(saved))
    inner = student.base_model.model
    assert inner.pre_classifier.weight.requires_grad and inner.classifier.weight.requires_grad


# --------------------------------------------------------------------------------------------
# Targets of modules that are not adapted; user errors
# --------------------------------------------------------------------------------------------


def test_targets_of_unadapted_modules_are_ignored(caplog):
    base = tiny_bert()
    targets = make_targets(base, ["query", "key", "value"])
    with caplog.at_level(logging.INFO, logger="sadlora.student"):
        student = build_student(
            base, lora_rank=RANK, target_modules=["query", "value"], init="spectral",
            targets=targets,
        )
    assert not any(name.endswith(".key") for name in adapted_module_names(student))
    ignored = [r.getMessage() for r in caplog.records if "Ignoring targets" in r.getMessage()]
    assert ignored and "bert.encoder.layer.0.attention.self.key" in ignored[0]


def _targets_missing_value(base):
    return make_targets(base, ["query"])


ERRORS = {
    "unknown init": (dict(init="svd"), r"Unknown init='svd'.*'spectral'"),
    "spectral without targets": (dict(init="spectral"), r"needs spectral targets.*targets=None"),
    "module without target": (
        dict(init="spectral", targets=_targets_missing_value),
        r"value'\] have no spectral target.*Targets exist for",
    ),
    "rank above stored k": (
        dict(init="spectral", targets=lambda b: make_targets(b, ["query", "value"], k=2)),
        r"lora_rank=4 exceeds the 2 basis vectors",
    ),
    "spectral_full without delta_w": (
        dict(init="spectral_full", targets=lambda b: make_targets(b, ["query", "value"])),
        r"delta_w=None",
    ),
    "rank above layer size": (dict(lora_rank=33), r"lora_rank=33 exceeds min\(d_out, d_in\)"),
    "no module matched": (
        dict(target_modules=["q_proj"]),
        r"target_modules=.*q_proj.*matches no module.*'query'",
    ),
    "not a linear layer": (dict(target_modules=["word_embeddings"]), r"not nn.Linear"),
    "non-positive rank": (dict(lora_rank=0), r"lora_rank must be a positive integer, got 0"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_user_errors_raise_before_touching_the_model(case):
    base = tiny_bert()
    kwargs = {"lora_rank": RANK, "target_modules": ["query", "value"], **ERRORS[case][0]}
    if callable(kwargs.get("targets")):
        kwargs["targets"] = kwargs["targets"](base)
    with pytest.raises(ValueError, match=ERRORS[case][1]):
        build_student(base, **kwargs)
    assert not has_lora(base)


def test_target_of_wrong_shape_is_rejected():
    base = tiny_bert()
    targets = make_targets(tiny_llama(), ["v_proj"])  # d_out 16, BERT's value has 32
    renamed = {
        f"bert.encoder.layer.{i}.attention.self.value": t
        for i, t in enumerate(targets.layers.values())
    }
    with pytest.raises(ValueError, match=r"d_out=32.*re-extract"):
        build_student(
            base, lora_rank=RANK, target_modules=["value"], init="spectral",
            targets=SpectralTargets(layers=renamed),
        )


def test_reading_factors_from_a_plain_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"no LoRA layer with adapter 'default'"):
        lora_factors(tiny_bert())
    with pytest.raises(FileNotFoundError, match=r"No adapter_config.json"):
        load_student(tiny_bert(), tmp_path)


def test_initialisers_are_the_documented_set():
    assert set(INITIALISERS) == {"gaussian", "spectral", "spectral_full", "pissa", "random_subspace"}


def test_random_subspace_init_is_orthonormal_uninformed_and_seeded():
    base = tiny_bert()
    before = logits(base)
    targets = make_targets(base, ["query", "value"])

    def build(seed: int):
        torch.manual_seed(seed)
        return build_student(copy.deepcopy(base), lora_rank=RANK, target_modules=["query", "value"],
                             init="random_subspace", targets=targets).eval()

    student = build(0)
    torch.testing.assert_close(logits(student), before, atol=1e-6, rtol=0)  # A = 0
    for name, (b, a) in lora_factors(student).items():
        torch.testing.assert_close(b.T @ b, torch.eye(RANK), atol=1e-5, rtol=0)
        assert torch.equal(a, torch.zeros_like(a))
        # Not the target's subspace: a random frame has cos^2 ~ r / d_out, far from 1.
        overlap = (targets.layers[name].basis[:, :RANK].T @ b).square().sum() / RANK
        assert overlap < 0.9
    again = lora_factors(build(0))
    other = lora_factors(build(1))
    name = next(iter(again))
    assert torch.equal(again[name][0], lora_factors(student)[name][0])
    assert not torch.equal(other[name][0], again[name][0])


def test_bert_pooler_is_part_of_the_trained_and_saved_head(tmp_path):
    """BERT's head reads pooler.dense in the backbone: it trains and saves with the adapter."""
    base = tiny_bert()
    student = build_student(copy.deepcopy(base), lora_rank=RANK, target_modules=["query", "value"])
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert any("pooler" in n and "modules_to_save" in n for n in trainable)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "pooler" in name and "modules_to_save" in name:
                parameter.add_(0.5)
    save_student(student.eval(), tmp_path)
    reloaded = load_student(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), logits(student), atol=1e-6, rtol=0)
    # When an adapter sits inside the pooler, the pooler is not also trained in full.
    inside = build_student(copy.deepcopy(base), lora_rank=RANK, target_modules=["dense"])
    assert not any("pooler" in n and "modules_to_save" in n for n, _ in inside.named_parameters())
