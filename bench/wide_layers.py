"""Data-weighted subspace of wide layers (d_out > d_in): eigh of K vs the SVD of dW F^T.

For an MLP up/gate projection K = dW Sigma dW^T is (d_out, d_out) with rank <= d_in, and
``eigh`` of such a rank-deficient matrix is LAPACK's slow case. ``data_weighted_subspace``
takes the SVD of Z = dW F^T (Sigma = F^T F) instead. This measures both routes, interleaved in
one process, on a realistic update: dW of rank d_in with decaying singular values and a Sigma
with a decaying spectrum (like calibrated LLM activations), and checks that they agree.

    python bench/wide_layers.py [--quick | --full] [--threads 1]
"""

from __future__ import annotations

import benchutil as bu
import torch

from sadlora.spectral import data_weighted_gram, data_weighted_subspace

NAME = "wide_layers"
# (d_out, d_in): SmolLM2-135M gate/up, Llama-3.2-1B-like gate/up scaled to fit 2 cores
SIZES = {
    "quick": {"shapes": [(384, 128)], "rounds": 2, "k": 16},
    "default": {"shapes": [(1536, 576), (3072, 768)], "rounds": 3, "k": 32},
    "full": {"shapes": [(1536, 576), (3072, 768), (8192, 2048)], "rounds": 5, "k": 64},
}


def problem(d_out: int, d_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(d_out, d_in, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator, dtype=torch.float64))[0]
    values = torch.logspace(0, -4, d_in, dtype=torch.float64)
    delta_w = left @ torch.diag(values) @ right.T * 1e-2
    rotation = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator,
                                           dtype=torch.float64))[0]
    sigma = rotation @ torch.diag(torch.logspace(1, -3, d_in, dtype=torch.float64)) @ rotation.T
    return delta_w, sigma


def main(argv: list[str] | None = None) -> dict:
    args = bu.parser(NAME, __doc__.split("\n")[0]).parse_args(argv)
    machine = bu.setup(args, NAME)
    size = SIZES[args.size]
    results, rows = {}, []
    for d_out, d_in in size["shapes"]:
        delta_w, sigma = problem(d_out, d_in, args.seed)
        k = size["k"]
        variants = {
            "eigh_of_K": lambda dw=delta_w, s=sigma, k=k: data_weighted_subspace(
                None, k=k, gram=data_weighted_gram(dw, s)),
            "svd_of_dW_F": lambda dw=delta_w, s=sigma, k=k: data_weighted_subspace(dw, s, k),
        }
        raw = bu.interleaved(variants, rounds=size["rounds"], progress=f"{d_out}x{d_in}")
        eigen, factor = (fn() for fn in variants.values())
        agreement = {
            "max_rel_value_error": float(((factor.singular_values - eigen.singular_values).abs()
                                          / eigen.singular_values).max()),
            "projector_max_abs_diff": float((factor.basis @ factor.basis.T
                                             - eigen.basis @ eigen.basis.T).abs().max()),
        }
        ratio = bu.ratios(raw, baseline="svd_of_dW_F")["eigh_of_K"]
        results[f"{d_out}x{d_in}"] = {
            "raw": raw, "summary": {n: bu.summary(r["wall"]) for n, r in raw.items()},
            "eigh_over_svd": ratio, "agreement": agreement}
        rows.append([f"{d_out} x {d_in}", bu.summary(raw["eigh_of_K"]["wall"])["median"],
                     bu.summary(raw["svd_of_dW_F"]["wall"])["median"],
                     ratio["wall_ratio_of_medians"], agreement["projector_max_abs_diff"]])
    payload = {"benchmark": NAME, "machine": machine,
               "config": {**vars(args), "size_spec": size}, "shapes": results}
    path = bu.write_result(args.out, payload)
    bu.print_table("wide layers: top-k data-weighted subspace",
                   ["d_out x d_in", "eigh of K (s)", "SVD of dW F^T (s)", "speed-up",
                    "max |P_eigh - P_svd|"], rows)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
