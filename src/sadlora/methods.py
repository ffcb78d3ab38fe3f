"""The distillation methods of DESIGN.md §2: what each one initialises, distils and aligns.

A method is a row of a table, not a branch in the training code: the trainer reads the row.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Method", "METHODS", "METHOD_ALIASES", "resolve_method"]


@dataclass(frozen=True)
class Method:
    """One row of the method table.

    init:      LoRA initialisation (``gaussian``, ``spectral``, ``spectral_full``, ``pissa``).
    kd:        logit distillation (``kl``, ``mse``) or None for the task loss alone.
    use_align: whether the config's alpha_align is used (else alpha = 0).
    use_coeff: whether the config's beta_coeff is used (else beta = 0).
    """

    init: str
    kd: str | None
    use_align: bool = False
    use_coeff: bool = False

    @property
    def needs_targets(self) -> bool:
        """Spectral targets are needed for spectral init or either spectral loss."""
        return self.init in ("spectral", "spectral_full") or self.use_align or self.use_coeff


METHODS: dict[str, Method] = {
    "lora": Method(init="gaussian", kd=None),
    "kd_lora": Method(init="gaussian", kd="kl"),
    "kd_lora_mse": Method(init="gaussian", kd="mse"),
    "spectral_init": Method(init="spectral", kd="kl"),
    "pissa": Method(init="pissa", kd="kl"),
    "sad_lora": Method(init="spectral", kd="kl", use_align=True, use_coeff=True),
    "sad_lora_align": Method(init="spectral", kd="kl", use_align=True),
    "sad_lora_coeff": Method(init="spectral", kd="kl", use_coeff=True),
}

# The paper's reference code named the baselines differently; its names keep working.
METHOD_ALIASES: dict[str, str] = {
    "standard_kd_lora": "kd_lora",
    "feature_kd_lora": "kd_lora_mse",
    "neural_nuggets_init": "spectral_init",
    "pissa_init": "pissa",
    "sad_lora_no_coeff": "sad_lora_align",
    "sad_lora_no_align": "sad_lora_coeff",
}


def resolve_method(name: str) -> tuple[str, Method]:
    """(canonical name, Method) for a method name or one of the seed's aliases."""
    canonical = METHOD_ALIASES.get(name, name)
    if canonical not in METHODS:
        raise ValueError(
            f"unknown method {name!r}; valid methods: {sorted(METHODS)} "
            f"(the seed's names {sorted(METHOD_ALIASES)} are accepted as aliases)."
        )
    return canonical, METHODS[canonical]
