"""Per-layer LoRA ranks from the targets (``rank_from_targets``, the energy-threshold ablation).

A tiny random BERT is the base; its "spectral teacher" is the base plus an exactly low-rank
update of a different rank in every adapted layer, so that the targets extracted with an energy
threshold have known, different ranks r*(eps) per layer. Nothing is downloaded.
"""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import save_tiny_bert, write_sentiment_csv
from transformers import AutoTokenizer, BertForSequenceClassification

from sadlora.commands import (
    DistillConfig,
    EvaluateConfig,
    ExtractConfig,
    distill,
    evaluate,
    extract,
)
from sadlora.geometry import principal_angles
from sadlora.losses import AlignmentTargets, alignment_loss
from sadlora.student import build_student, load_student, lora_factors, lora_scaling, save_student
from sadlora.targets import LayerTarget, SpectralTargets, load_targets

QUERY0, VALUE0 = (f"bert.encoder.layer.0.attention.self.{m}" for m in ("query", "value"))
QUERY1, VALUE1 = (f"bert.encoder.layer.1.attention.self.{m}" for m in ("query", "value"))
# Rank of the teacher's update dW in each adapted layer: what r*(eps) must find.
UPDATE_RANKS = {QUERY0: 1, VALUE0: 3, QUERY1: 5, VALUE1: 2}
MODULES = ["query", "value"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("layer_ranks")
    options = write_sentiment_csv(root, train=48, validation=16)
    common = dict(task="custom", task_options=options, max_length=32)
    save_tiny_bert(root / "base", hidden=32)
    save_tiny_bert(root / "kd_teacher", hidden=48, seed=1)
    teacher = BertForSequenceClassification.from_pretrained(root / "base")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, rank in UPDATE_RANKS.items():
            weight = teacher.get_submodule(name).weight
            u, v = (torch.linalg.qr(torch.randn(n, rank, generator=generator,
                                                dtype=torch.float64)).Q for n in weight.shape)
            weight += (u * torch.linspace(1.0, 0.6, rank, dtype=torch.float64)) @ v.T
    teacher.save_pretrained(root / "spectral_teacher")
    AutoTokenizer.from_pretrained(root / "base").save_pretrained(root / "spectral_teacher")
    # Keep 99.9% of tr K (eps = 1e-3): exactly the rank of each update.
    extract(ExtractConfig(spectral_teacher=str(root / "spectral_teacher"),
                          base_model=str(root / "base"), output_dir=str(root / "targets"),
                          rank=None, energy_threshold=0.999, max_rank=8, calibration_examples=48,
                          target_modules=MODULES, progress=False, **common))
    return {"root": root, "common": common, "targets": load_targets(root / "targets")}


def base_model(setup, dtype=torch.float32):
    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(setup["root"] / "base").to(dtype).eval()


def logits(model):
    ids = torch.randint(5, 30, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def float64_targets(targets) -> dict[str, LayerTarget]:
    """The same targets recomputed in float64 from their stored dW and Sigma (an independent
    oracle: K = dW Sigma dW^T, eigh), keeping each layer's selected rank."""
    layers = {}
    for name, target in targets.layers.items():
        delta, sigma = target.delta_w.double(), target.sigma.double()
        values, vectors = torch.linalg.eigh(delta @ sigma @ delta.T)
        order = values.argsort(descending=True)[: target.basis.shape[1]]
        layers[name] = LayerTarget(
            basis=vectors[:, order], singular_values=values[order].clamp_min(0).sqrt(),
            total_energy=values.sum(), rank=target.rank, gap=target.gap, sigma=sigma,
            delta_w=delta)
    return layers


def test_energy_threshold_ranks_differ_and_shape_the_lora_factors(setup):
    targets = setup["targets"]
    assert targets.ranks == UPDATE_RANKS
    student = build_student(base_model(setup), lora_rank=8, target_modules=MODULES,
                            init="spectral", targets=targets, layer_ranks=targets.ranks)
    for name, (b, a) in lora_factors(student).items():
        rank = UPDATE_RANKS[name]
        assert tuple(b.shape) == (32, rank) and tuple(a.shape) == (rank, 32), name
        # B = U_{r_l}: the layer's own top r_l directions.
        assert torch.equal(b, targets.layers[name].basis[:, :rank])
    config = student.peft_config["default"]
    assert sorted(config.rank_pattern.values()) == sorted(UPDATE_RANKS.values())
    assert lora_scaling(student) == 1.0  # alpha_pattern = r_l: one scaling


def test_spectral_init_per_layer_is_the_target_subspace_in_float64(setup):
    layers = float64_targets(setup["targets"])
    # The float64 oracle agrees with the stored float32 subspaces.
    for name, target in layers.items():
        rank = UPDATE_RANKS[name]
        stored = setup["targets"].layers[name].basis[:, :rank].double()
        assert principal_angles(target.basis[:, :rank], stored).max() < 1e-3
    base = base_model(setup, torch.float64)
    before = logits(base)
    student = build_student(base, lora_rank=8, target_modules=MODULES, init="spectral",
                            targets=SpectralTargets(layers=layers),
                            layer_ranks=UPDATE_RANKS).eval()
    factors = lora_factors(student)
    assert all(b.dtype == torch.float64 for b, _ in factors.values())
    # colspan(B) = span(U_{r_l}) per layer: the projection loss of every layer ~ 0.
    alignment = AlignmentTargets(layers, UPDATE_RANKS)
    assert {g.rank for g in alignment.groups} == set(UPDATE_RANKS.values())
    for group, (b, _) in zip(alignment.groups, alignment.stack(factors, with_a=False)):
        loss = alignment_loss(b, alignment.basis(group))
        assert loss.abs().max() < 1e-12, group
    # A = 0 in every layer: the output is unchanged at step 0.
    torch.testing.assert_close(logits(student), before, atol=1e-12, rtol=0)


def test_spectral_full_per_layer_with_one_scaling(setup):
    layers = float64_targets(setup["targets"])
    student = build_student(base_model(setup, torch.float64), lora_rank=8, lora_alpha=16,
                            target_modules=MODULES, init="spectral_full",
                            targets=SpectralTargets(layers=layers),
                            layer_ranks=UPDATE_RANKS)
    scaling = lora_scaling(student)
    assert scaling == 2.0  # lora_alpha / lora_rank, whatever each layer's rank
    assert student.peft_config["default"].alpha_pattern == {
        k: 2.0 * r for k, r in student.peft_config["default"].rank_pattern.items()}
    for name, (b, a) in lora_factors(student).items():
        u = layers[name].basis[:, : UPDATE_RANKS[name]]
        # s B A = U_r U_r^T dW: here dW itself, whose rank is r_l.
        torch.testing.assert_close(scaling * b.detach() @ a.detach(), u @ u.T @ layers[name].delta_w,
                                   atol=1e-12, rtol=0)
        torch.testing.assert_close(scaling * b.detach() @ a.detach(), layers[name].delta_w,
                                   atol=1e-6, rtol=0)


def test_reload_and_merge_reproduce_per_layer_rank_student(setup, tmp_path):
    targets = setup["targets"]
    student = build_student(base_model(setup), lora_rank=8, target_modules=MODULES,
                            init="spectral", targets=targets, layer_ranks=targets.ranks).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move away from A = 0, as training would
        for b, a in lora_factors(student).values():
            b.add_(0.1 * torch.randn(b.shape, generator=generator))
            a.add_(0.3 * torch.randn(a.shape, generator=generator))
        student.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    expected = logits(student)
    save_student(student, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["rank_pattern"].values()) == sorted(UPDATE_RANKS.values())

    for reloaded in (PeftModel.from_pretrained(base_model(setup), str(tmp_path)),
                     load_student(base_model(setup), tmp_path)):
        reloaded.eval()
        shapes = {n: tuple(b.shape) for n, (b, _) in lora_factors(reloaded).items()}
        assert shapes == {n: (32, r) for n, r in UPDATE_RANKS.items()}
        torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)
    merged = reloaded.merge_and_unload()
    assert not isinstance(merged, PeftModel)
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)


def test_layer_ranks_must_cover_every_adapted_module(setup):
    base = base_model(setup)
    missing = {n: r for n, r in UPDATE_RANKS.items() if n != VALUE1}
    with pytest.raises(ValueError, match=r"no rank for adapted module\(s\) \['bert.encoder.layer.1"):
        build_student(base, target_modules=MODULES, layer_ranks=missing)
    with pytest.raises(ValueError, match=r"layer rank 9 exceeds the 8 basis vectors"):
        build_student(base, target_modules=MODULES, init="spectral", targets=setup["targets"],
                      layer_ranks={**UPDATE_RANKS, QUERY0: 9})
    assert not any("lora" in n for n, _ in base.named_modules())


def test_differing_scalings_are_still_refused(setup):
    # A rank_pattern without its alpha_pattern gives s = alpha / r_l per layer: not one scaling.
    config = LoraConfig(r=4, lora_alpha=4, target_modules=MODULES,
                            rank_pattern={"query": 2})
    model = get_peft_model(base_model(setup), config)
    with pytest.raises(ValueError, match="different scalings per layer"):
        lora_scaling(model)


def test_distill_with_rank_from_targets(setup):
    root = setup["root"]
    config = DistillConfig(
        student_model=str(root / "base"), teacher=str(root / "kd_teacher"),
        targets=str(root / "targets"), method="sad_lora_align", rank_from_targets=True,
        lora_rank=8, max_steps=3, batch_size=16, learning_rate=1e-2, target_modules=MODULES,
        teacher_cache_dir=str(root / "cache"), teacher_bf16=False, monitor_every=1,
        logging_steps=1, output_dir=str(root / "distill"), progress=False, **setup["common"])
    result = distill(config)
    metrics = json.loads((root / "distill" / "metrics.json").read_text())
    assert metrics["layer_ranks"] == UPDATE_RANKS == result["layer_ranks"]
    assert metrics["config"]["rank_from_targets"] is True
    for name, layer in metrics["layers"].items():
        assert layer["rank"] == len(layer["angles_deg"]) == UPDATE_RANKS[name]
    assert metrics["mean_alignment"] > 0.9  # spectral init + alignment loss, per-layer r_l
    record = json.loads((root / "distill" / "alignment.jsonl").read_text().splitlines()[-1])
    assert {n: len(layer["angles_deg"]) for n, layer in record["layers"].items()} == UPDATE_RANKS
    # The saved adapter reloads with its per-layer ranks and scores what the run reported.
    evaluated = evaluate(EvaluateConfig(student_model=str(root / "base"),
                                        adapter=str(root / "distill"), merge=True,
                                        **setup["common"]))
    assert evaluated["metrics"]["validation"]["accuracy"] == pytest.approx(
        result["metrics"]["validation"]["accuracy"])


def test_rank_from_targets_without_targets_is_an_error(setup, tmp_path):
    root = setup["root"]
    config = DistillConfig(student_model=str(root / "base"), teacher=str(root / "kd_teacher"),
                           targets=None, method="kd_lora", rank_from_targets=True,
                           output_dir=str(tmp_path), progress=False, **setup["common"])
    with pytest.raises(ValueError, match=r"rank_from_targets=true.*set targets=<folder"):
        distill(config)
    assert not any(tmp_path.iterdir())
