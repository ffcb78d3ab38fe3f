"""Benchmark 4: how the spectral costs scale, with fitted log-log exponents.

1. ``width``: per-layer extraction cost vs the layer width d (d_out = d_in = d), without a
   model: stream ``tokens`` random float32 activations (batches of 2048) into a
   ``SecondMoment`` (float32 products, float64 sums), then ``data_weighted_subspace`` (K =
   dW Sigma dW^T and ``eigh`` in float64), top 64 kept. Timed separately: ``accumulate``
   (expected ~ d^2 at fixed tokens), ``eigh`` (K and its eigendecomposition, ~ d^3) and their sum.
2. ``layers``: one training step's alignment cost vs the number of adapted layers L, no model:
   the SADLoss spectral terms (projection, energy, and projection + coefficient with Sigma)
   forward + backward on L leaf (B, A) pairs of a 768-wide layer (r = 8, k = 64), vs the
   paper code's per-layer QR + svdvals + ``.item()``. Expected ~ L (batched: one group).

Each point is the median of ``rounds`` interleaved repeats, of the process CPU time (the fits;
meant for ``--threads 1`` on a busy machine) and of the wall time (also in the JSON). Sizes (``--size``): default widths
256 / 512 / 1024 with 2048 tokens, layers 24 / 56 / 112 / 224; ``--full`` widths
384 / 768 / 1536 / 2048 / 3072 / 4096 with 16384 tokens (eigh at 4096 takes minutes on 2 cores).
"""

from __future__ import annotations

import statistics
import sys

import benchutil as bu
import torch

from sadlora.losses import AlignmentTargets, SADLoss
from sadlora.spectral import SecondMoment, data_weighted_subspace
from sadlora.targets import LayerTarget

NAME = "scaling"
SIZES = {
    "quick": dict(widths=[64, 128, 256], tokens=1024, layers=[4, 8, 16], width_rounds=2,
                  layer_rounds=3),
    "default": dict(widths=[256, 512, 1024], tokens=2048, layers=[24, 56, 112, 224],
                    width_rounds=2, layer_rounds=5),
    "full": dict(widths=[384, 768, 1536, 2048, 3072, 4096], tokens=16384,
                 layers=[24, 56, 112, 224], width_rounds=3, layer_rounds=15),
}
TOKEN_BATCH = 2048
LAYER_WIDTH, RANK, K = 768, 8, 64


# --------------------------------------------------------------------------------------------
# Extraction vs width
# --------------------------------------------------------------------------------------------


def width_point(d: int, tokens: int, rounds: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randn(TOKEN_BATCH, d, generator=generator)
               for _ in range(max(1, tokens // TOKEN_BATCH))]
    delta = torch.randn(d, d, generator=generator, dtype=torch.float64) / d**0.5
    state: dict = {}

    def accumulate():
        moment = SecondMoment(d)
        for batch in batches:
            moment.update(batch)
        state["sigma"] = moment.mean()

    def eigh():
        data_weighted_subspace(delta, state["sigma"], k=min(K, d))

    accumulate()
    raw = bu.interleaved({"accumulate": accumulate, "eigh": eigh}, rounds=rounds, warmup=0)
    medians = _medians(raw)
    print(f"[{NAME}/width] d={d}: {medians}", file=sys.stderr, flush=True)
    return {"d": d, "raw": raw, "median": {**medians, "total": sum(medians.values())},
            "median_wall": _medians(raw, "wall")}


def _medians(raw: dict, clock: str = "cpu") -> dict[str, float]:
    # CPU time of this (single-threaded) process by default: on a machine whose cores are
    # taken by other jobs it measures the work done, not the time spent waiting for a core.
    return {name: statistics.median(series[clock]) for name, series in raw.items()}


# --------------------------------------------------------------------------------------------
# Alignment cost vs number of layers
# --------------------------------------------------------------------------------------------


def _layer_targets(count: int, generator: torch.Generator) -> dict[str, LayerTarget]:
    sigma = torch.eye(LAYER_WIDTH) + 0.1 * torch.ones(LAYER_WIDTH, LAYER_WIDTH) / LAYER_WIDTH
    targets = {}
    for index in range(count):
        basis, _ = torch.linalg.qr(torch.randn(LAYER_WIDTH, K, generator=generator))
        values = torch.exp(-torch.arange(K, dtype=torch.float32) / 8.0)
        targets[f"layer{index}"] = LayerTarget(basis=basis, singular_values=values,
                                               total_energy=values.square().sum(), rank=RANK,
                                               gap=2.0, sigma=sigma)
    return targets


def _reference(factors: dict, bases: dict) -> torch.Tensor:
    total = 0.0
    log = {}
    for name, (b, _) in factors.items():
        q, _ = torch.linalg.qr(b)
        cosines = torch.linalg.svdvals(bases[name].T @ q).clamp(max=1.0)
        term = 1.0 - cosines.square().mean()
        log[name] = term.item()
        total = total + term
    return total / len(factors)


def layers_point(count: int, rounds: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    targets = _layer_targets(count, generator)
    with_sigma = AlignmentTargets(targets, RANK)
    plain = AlignmentTargets({n: LayerTarget(basis=t.basis, singular_values=t.singular_values,
                                             total_energy=t.total_energy, rank=RANK, gap=2.0)
                              for n, t in targets.items()}, RANK)
    factors = {n: (torch.randn(LAYER_WIDTH, RANK, generator=generator).requires_grad_(),
                   torch.randn(RANK, LAYER_WIDTH, generator=generator).requires_grad_() * 1e-2)
               for n in targets}
    factors = {n: (b, a.detach().requires_grad_()) for n, (b, a) in factors.items()}
    logits = torch.zeros(1, 2)
    losses = {
        "projection": SADLoss(plain, alpha=1.0, task_weight=0.0, kd_weight=0.0),
        "energy": SADLoss(plain, alpha=1.0, align_kind="energy", task_weight=0.0, kd_weight=0.0),
        "projection_coeff": SADLoss(with_sigma, alpha=1.0, beta=1.0, task_weight=0.0,
                                    kd_weight=0.0),
    }
    bases = {n: t.basis[:, :RANK].contiguous() for n, t in targets.items()}

    def ours(loss: SADLoss):
        def call():
            loss(factors, student_logits=logits, problem_type="single_label_classification",
                 step=0)["total"].backward()
            _clear(factors)
        return call

    def reference():
        _reference(factors, bases).backward()
        _clear(factors)

    variants = {name: ours(loss) for name, loss in losses.items()}
    variants["reference"] = reference
    raw = bu.interleaved(variants, rounds=rounds, warmup=2)
    medians = _medians(raw)
    print(f"[{NAME}/layers] L={count}: {medians}", file=sys.stderr, flush=True)
    return {"layers": count, "raw": raw, "median": medians, "median_wall": _medians(raw, "wall")}


def _clear(factors: dict) -> None:
    for b, a in factors.values():
        b.grad = a.grad = None


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _fits(points: list[dict], key: str, field: str = "median") -> dict:
    names = points[0][field].keys()
    xs = [p[key] for p in points]
    return {name: bu.fit_power_law(xs, [p[field][name] for p in points]) for name in names}


def main(argv: list[str] | None = None) -> dict:
    p = bu.parser(NAME, __doc__.split("\n")[0])
    args = p.parse_args(argv)
    machine = bu.setup(args, NAME)
    size = SIZES[args.size]
    widths = [width_point(d, size["tokens"], size["width_rounds"], args.seed)
              for d in size["widths"]]
    layers = [layers_point(count, size["layer_rounds"], args.seed) for count in size["layers"]]
    width_fit, layer_fit = _fits(widths, "d"), _fits(layers, "layers")
    wall_fits = {"width": _fits(widths, "d", "median_wall"),
                 "layers": _fits(layers, "layers", "median_wall")}
    payload = {
        "benchmark": NAME, "machine": machine, "config": {**vars(args), "size_spec": size},
        "clock": "process CPU time (fits, tables); wall-time fits in wall_clock_fits",
        "wall_clock_fits": wall_fits,
        "width": {"points": widths, "fits": width_fit},
        "layers": {"points": layers, "fits": layer_fit,
                   "reference_over_ours": [p["median"]["reference"] / p["median"]["projection"]
                                           for p in layers]},
        "ratios": {"width_exponent_total": width_fit["total"]["exponent"],
                   "width_exponent_accumulate": width_fit["accumulate"]["exponent"],
                   "width_exponent_eigh": width_fit["eigh"]["exponent"],
                   "layers_exponent_projection": layer_fit["projection"]["exponent"],
                   "layers_exponent_reference": layer_fit["reference"]["exponent"]},
    }
    path = bu.write_result(args.out, payload)
    bu.print_table(f"extraction per layer vs width ({size['tokens']} tokens), CPU s",
                   ["d", "accumulate s", "eigh s", "total s"],
                   [[p["d"], p["median"]["accumulate"], p["median"]["eigh"],
                     p["median"]["total"]] for p in widths])
    bu.print_table("alignment step cost (forward + backward) vs adapted layers, CPU ms",
                   ["L", *layers[0]["median"].keys()],
                   [[p["layers"], *(1e3 * v for v in p["median"].values())] for p in layers])
    print("exponents: " + ", ".join(f"width/{n}={f['exponent']:.2f}"
                                    for n, f in width_fit.items())
          + ", " + ", ".join(f"layers/{n}={f['exponent']:.2f}" for n, f in layer_fit.items()))
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
