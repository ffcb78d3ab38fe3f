"""Benchmark 1: training-step overhead of the SAD-LoRA losses over plain KD-LoRA.

One training step = student forward + loss + backward + gradient clipping (max norm 1, as the
Trainer does) + AdamW step, on a random-initialised model built from its config (no download):

- ``roberta``: RoBERTa-base shape (12 layers, hidden 768, 12 heads, FFN 3072, vocab 50265),
  sequence classification (2 labels), LoRA r = 8 on query/value (24 adapted layers);
- ``llama``: a SmolLM2-135M-shaped decoder (hidden 576, FFN 1536, 9 heads / 3 KV heads,
  vocab 49152; 30 layers at ``--full``, 2 by default), LoRA r = 8 on all seven projections
  q, k, v, o, gate, up, down (7 adapted layers per block), causal-LM KD over the vocabulary.

Sizes (``--size``): default batch 2 x 64 and 2 Llama layers (fits ~6 min on 2 cores shared with
other jobs);
``--full`` the issue's batch 16 x 128 and 30 Llama layers. A smaller batch makes the ratio
pessimistic: the spectral terms cost the same per step whatever the batch.

The KD teacher is a fixed random logit tensor (no teacher forward: it is the same for all
methods and would only dilute the ratio). Variants, all on the SAME PEFT student and optimizer
(the loss is the only difference; the cost of a step does not depend on the adapter values):

- ``kd_lora``                    SADLoss without targets (KL + task loss): the baseline;
- ``sad_lora_align_projection``  + alpha L_align, projection kind (the recommended default);
- ``sad_lora_align_energy``      + alpha L_align, energy kind;
- ``sad_lora``                   + alpha L_align + beta L_coeff with each layer's Sigma;
- ``reference_align``            KD + the paper code's alignment: per layer QR(B), svdvals of
                                 U_r^T Q, and ``.item()`` of every layer's loss every step;
- ``reference_sad``              ``reference_align`` + its coefficient loss: per layer
                                 svdvals(s B A) (a d_out x d_in SVD) against sigma~, ``.item()``.

Spectral targets are synthetic (random orthonormal U_k with k = min(64, d_out), decaying
sigma~, random SPD Sigma per distinct input), with exactly the shapes ``build_targets``
writes. Two measurements:

1. ``step``: whole training steps, interleaved across variants (``--rounds`` rounds);
2. ``loss_only``: just the loss (all terms) + its backward on a fixed logit leaf, many rounds:
   a low-noise estimate of the overhead; ``projected_ratio`` = (KD step + loss overhead) / KD step.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable

import benchutil as bu
import torch

from sadlora.losses import AlignmentTargets, SADLoss
from sadlora.student import build_student, lora_factors, lora_scaling
from sadlora.targets import LayerTarget, SpectralTargets

NAME = "step_overhead"
BASELINE = "kd_lora"
REFERENCE = "reference_align"
LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROBERTA_MODULES = ["query", "value"]


# --------------------------------------------------------------------------------------------
# Models and synthetic targets
# --------------------------------------------------------------------------------------------


def roberta_model(quick: bool):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    shape = (dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                  intermediate_size=128, vocab_size=1000) if quick else
             dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                  intermediate_size=3072, vocab_size=50265))
    config = RobertaConfig(**shape, max_position_embeddings=514, num_labels=2,
                           type_vocab_size=1)
    return RobertaForSequenceClassification(config), ROBERTA_MODULES, "single_label_classification"


def llama_model(quick: bool, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = (dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=500) if quick else
             dict(num_hidden_layers=layers, hidden_size=576, intermediate_size=1536,
                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152))
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True)
    return LlamaForCausalLM(config), LLAMA_MODULES, "causal_lm"


def _adapted_linears(model: torch.nn.Module, suffixes: list[str]) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in suffixes}


def _spd(dim: int, generator: torch.Generator) -> torch.Tensor:
    # An uncentred second moment with a decaying spectrum, like real hidden states.
    scales = torch.arange(1, dim + 1, dtype=torch.float32) ** -0.7
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
    return (q * scales) @ q.T + 1e-3 * torch.eye(dim)


def synthetic_targets(model: torch.nn.Module, suffixes: list[str], *, max_rank: int = 64,
                      seed: int = 0) -> SpectralTargets:
    """Targets with the shapes build_targets writes: basis (d_out, k), sigma~ (k,), tr K,
    and a Sigma (d_in, d_in) per layer, shared (one tensor) by layers reading the same input
    (same block, same d_in and not down/o: approximated by block + d_in)."""
    generator = torch.Generator().manual_seed(seed)
    layers, sigmas = {}, {}
    for name, module in _adapted_linears(model, suffixes).items():
        d_out, d_in = module.out_features, module.in_features
        k = min(max_rank, d_out)
        basis, _ = torch.linalg.qr(torch.randn(d_out, k, generator=generator))
        values = 10.0 * torch.exp(-torch.arange(k, dtype=torch.float32) / 8.0)
        block = name.rsplit(".", 2)[0]
        sharing = block if name.rsplit(".", 1)[-1] not in ("o_proj", "down_proj") else name
        sigma = sigmas.setdefault((sharing, d_in), _spd(d_in, generator))
        layers[name] = LayerTarget(basis=basis.contiguous(), singular_values=values,
                                   total_energy=values.square().sum() * 1.25, rank=8, gap=2.0,
                                   sigma=sigma)
    return SpectralTargets(layers=layers, metadata={"synthetic": True})


def _without_sigma(targets: SpectralTargets) -> dict[str, LayerTarget]:
    return {name: LayerTarget(basis=t.basis, singular_values=t.singular_values,
                              total_energy=t.total_energy, rank=t.rank, gap=t.gap)
            for name, t in targets.layers.items()}


# --------------------------------------------------------------------------------------------
# The paper code's approach (the baseline to beat), written here from its description
# --------------------------------------------------------------------------------------------


class ReferenceSpectralLoss:
    """Per layer, one at a time: Q = QR(B), cos theta = svdvals(U_r^T Q), L_align = mean sin^2;
    optionally L_coeff = sum (sv(s B A) - sigma~)^2 / sum sigma~^2 with a full SVD of s B A;
    every layer's value is read with ``.item()`` every step (the reference logs them)."""

    def __init__(self, targets: SpectralTargets, rank: int, scaling: float, coeff: bool):
        self.bases = {n: t.basis[:, :rank].contiguous() for n, t in targets.layers.items()}
        self.values = {n: t.singular_values[:rank] for n, t in targets.layers.items()}
        self.rank, self.scaling, self.coeff = rank, scaling, coeff
        self.log: dict[str, float] = {}

    def __call__(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        total = None
        for name, (b, a) in factors.items():
            with torch.autocast("cpu", enabled=False):
                q, _ = torch.linalg.qr(b.float())
                cosines = torch.linalg.svdvals(self.bases[name].T @ q).clamp(max=1.0)
                term = 1.0 - cosines.square().mean()
                if self.coeff:
                    values = torch.linalg.svdvals(self.scaling * b.float() @ a.float())[:self.rank]
                    target = self.values[name]
                    term = term + (values - target).square().sum() / target.square().sum()
            self.log[name] = term.item()  # host sync per layer and step
            total = term if total is None else total + term
        return total / len(factors)


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------


def make_losses(targets: SpectralTargets, rank: int, scaling: float,
                problem_type: str) -> dict[str, Callable]:
    """{variant: loss(model, logits, teacher, labels, step) -> scalar}."""
    plain = AlignmentTargets(_without_sigma(targets), rank)
    with_sigma = AlignmentTargets(targets, rank)
    kd = SADLoss(None, alpha=0.0, beta=0.0)
    modules = {
        "kd_lora": kd,
        "sad_lora_align_projection": SADLoss(plain, alpha=1.0, align_kind="projection"),
        "sad_lora_align_energy": SADLoss(plain, alpha=1.0, align_kind="energy"),
        "sad_lora": SADLoss(with_sigma, alpha=1.0, beta=1.0, align_kind="projection",
                            scaling=scaling),
    }

    def sad(module: SADLoss):
        def loss(model, logits, teacher, labels, step):
            # As DistillationTrainer.compute_loss: live factors, then SADLoss.
            return module(lora_factors(model), student_logits=logits, teacher_logits=teacher,
                          labels=labels, problem_type=problem_type, step=step)["total"]
        return loss

    def reference(spectral: ReferenceSpectralLoss):
        def loss(model, logits, teacher, labels, step):
            factors = lora_factors(model)
            terms = kd(factors, student_logits=logits, teacher_logits=teacher, labels=labels,
                       problem_type=problem_type, step=step)
            return terms["total"] + spectral(factors)
        return loss

    losses = {name: sad(module) for name, module in modules.items()}
    losses["reference_align"] = reference(ReferenceSpectralLoss(targets, rank, scaling, False))
    losses["reference_sad"] = reference(ReferenceSpectralLoss(targets, rank, scaling, True))
    losses["_groups"] = plain.extra_repr()  # type: ignore[assignment]
    return losses


def run_model(kind: str, args) -> dict:
    torch.manual_seed(args.seed)
    if kind == "roberta":
        base, suffixes, problem_type = roberta_model(args.quick)
    else:
        base, suffixes, problem_type = llama_model(args.quick, args.llama_layers)
    targets = synthetic_targets(base, suffixes, seed=args.seed)
    model = build_student(base, lora_rank=args.rank, target_modules=suffixes, init="spectral",
                          targets=targets)
    model.train()
    scaling = lora_scaling(model)
    losses = make_losses(targets, args.rank, scaling, problem_type)
    groups = losses.pop("_groups")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(5, vocab, (args.batch, args.seq), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if problem_type == "causal_lm":
        labels = ids.clone()
        teacher = torch.randn(args.batch, args.seq, vocab, generator=gen)
    else:
        labels = torch.randint(0, 2, (args.batch,), generator=gen)
        teacher = torch.randn(args.batch, 2, generator=gen)
    state = {"step": 0}

    def train_step(loss_fn: Callable) -> Callable[[], None]:
        def step():
            logits = model(**inputs).logits
            loss = loss_fn(model, logits, teacher, labels, state["step"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
        return step

    variants = {name: train_step(fn) for name, fn in losses.items()
                if name in args.variants or name == BASELINE}
    print(f"[{NAME}] {kind}: {sum(p.numel() for p in model.parameters())/1e6:.1f}M params, "
          f"{len(targets.layers)} adapted layers, groups: {groups}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    step_raw = bu.interleaved(variants, rounds=args.rounds, warmup=args.warmup,
                              progress=f"{NAME}/{kind}/step")
    step_seconds = time.perf_counter() - started

    # Loss alone (+ its backward) on a fixed logit leaf: the overhead with little noise.
    with torch.no_grad():
        fixed = model(**inputs).logits.detach()
    leaf = fixed.clone().requires_grad_(True)

    def loss_only(loss_fn: Callable) -> Callable[[], None]:
        def run():
            loss_fn(model, leaf, teacher, labels, state["step"]).backward()
            leaf.grad = None
            for p in params:
                p.grad = None
        return run

    loss_raw = bu.interleaved({name: loss_only(losses[name]) for name in variants},
                              rounds=args.loss_rounds, warmup=2)
    factors_raw = bu.interleaved({"lora_factors": lambda: lora_factors(model)},
                                 rounds=args.loss_rounds, warmup=2)

    kd_step = statistics.median(step_raw[BASELINE]["wall"])
    kd_loss = statistics.median(loss_raw[BASELINE]["wall"])
    projected = {name: (kd_step + statistics.median(series["wall"]) - kd_loss) / kd_step
                 for name, series in loss_raw.items() if name != BASELINE}
    overhead_ms = {name: 1e3 * (statistics.median(series["wall"]) - kd_loss)
                   for name, series in loss_raw.items() if name != BASELINE}
    result = {
        "model": kind, "problem_type": problem_type, "adapted_layers": len(targets.layers),
        "target_groups": groups, "lora_rank": args.rank, "batch": args.batch, "seq": args.seq,
        "parameters_millions": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_parameters": sum(p.numel() for p in params),
        "step_seconds_total": step_seconds,
        "step": {"summary": {n: {c: bu.summary(v) for c, v in s.items()}
                             for n, s in step_raw.items()},
                 "ratios_vs_kd_lora": bu.ratios(step_raw, BASELINE), "raw": step_raw},
        "loss_only": {"summary": {n: {c: bu.summary(v) for c, v in s.items()}
                                  for n, s in loss_raw.items()},
                      "overhead_ms_vs_kd_lora": overhead_ms, "raw": loss_raw},
        "lora_factors_call": {"summary": bu.summary(factors_raw["lora_factors"]["wall"]),
                              "raw": factors_raw["lora_factors"]},
        "projected_ratio_vs_kd_lora": projected,
    }
    return result


def _targets(results: dict) -> dict:
    checks = {}
    for kind, res in results.items():
        direct = res["step"]["ratios_vs_kd_lora"]
        for name in ("sad_lora_align_projection", "sad_lora_align_energy", "sad_lora"):
            if name not in direct:
                continue
            checks[f"{kind}/{name}/step_ratio"] = bu.target(
                direct[name]["wall_median_paired_ratio"], at_most=1.03,
                note="direct: median over rounds of (SAD step / KD step of the same round)")
            checks[f"{kind}/{name}/projected_ratio"] = bu.target(
                res["projected_ratio_vs_kd_lora"][name], at_most=1.03,
                note="(KD step median + loss-only overhead median) / KD step median")
    return checks


SIZES = {  # (batch, seq, llama layers, step rounds, loss-only rounds)
    "quick": (2, 16, 2, 2, 3),
    "default": (2, 64, 2, 3, 8),
    "full": (16, 128, 30, 5, 30),
}


def main(argv: list[str] | None = None) -> dict:
    p = bu.parser(NAME, __doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["roberta", "llama"],
                   choices=["roberta", "llama"])
    p.add_argument("--batch", type=int, default=None, help="sequences per step")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--llama-layers", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds of whole steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--loss-rounds", type=int, default=None, help="rounds of the loss alone")
    p.add_argument("--variants", nargs="+",
                   default=["sad_lora_align_projection", "sad_lora_align_energy", "sad_lora",
                            "reference_align", "reference_sad"])
    args = p.parse_args(argv)
    machine = bu.setup(args, NAME)
    args.quick = args.size == "quick"
    batch, seq, llama_layers, rounds, loss_rounds = SIZES[args.size]
    args.batch = args.batch or batch
    args.seq = args.seq or seq
    args.llama_layers = args.llama_layers or llama_layers
    args.rounds = args.rounds or rounds
    args.loss_rounds = args.loss_rounds or loss_rounds
    if args.quick:
        args.rank = min(args.rank, 4)
    results = {}
    for kind in args.models:
        results[kind] = run_model(kind, args)
        gc.collect()  # the previous model's memory is free before the next one is built
    payload = {
        "benchmark": NAME, "machine": machine, "config": vars(args),
        "results": results,
        "ratios": {kind: {**{f"step/{n}": r["wall_median_paired_ratio"]
                             for n, r in res["step"]["ratios_vs_kd_lora"].items()},
                          **{f"projected/{n}": v
                             for n, v in res["projected_ratio_vs_kd_lora"].items()}}
                   for kind, res in results.items()},
        "targets": _targets(results),
    }
    path = bu.write_result(args.out, payload)
    for kind, res in results.items():
        rows = []
        step_sum = res["step"]["summary"]
        for name in step_sum:
            direct = res["step"]["ratios_vs_kd_lora"].get(name, {})
            rows.append([name, step_sum[name]["wall"]["median"],
                         direct.get("wall_median_paired_ratio", 1.0),
                         direct.get("cpu_median_paired_ratio", 1.0),
                         res["loss_only"]["overhead_ms_vs_kd_lora"].get(name, 0.0),
                         res["projected_ratio_vs_kd_lora"].get(name, 1.0)])
        bu.print_table(f"{kind} (batch {args.batch}x{args.seq}, {res['adapted_layers']} layers)",
                       ["variant", "step s (median)", "step ratio (wall)", "step ratio (cpu)",
                        "loss overhead ms", "projected ratio"], rows)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
