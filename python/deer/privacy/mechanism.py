"""The privacy mechanism of one private release, described once.

A `Mechanism` says how per-sample gradients are measured and clipped, and how the noise is shaped
(docs/design.md sections 3-6):

    metric    'euclidean' | 'regulated'   the norm a sample is clipped in (regulated: ||g||_K)
    noise     'isotropic' | 'regulated'   N(0, I) or N(0, K^{-1}) through the frozen factor
    clipping  'flat' | 'per_layer'        one bound over all trained tensors, or one per tensor
    lam       the ridge of K = frozen^T frozen + lam I

The presets are the modes deer documents (docs/privacy.md): `isotropic` (DP-SGD),
`regulated_metric` (DEeR's regulator with the sound whitened accounting, charged sigma) and
`regulated_paper` (Euclidean clipping + regulated noise, charged sigma / max sigma_max(frozen)).
`make_private`, the federated methods, the server aggregate and the audit all take a Mechanism;
strings are parsed by `mechanism()` at the API edge.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import reference as ref

#: The one default ridge of the regulated metric, for the drop-in engine and the federated trainer:
#: it bounds the regulated noise's covariance K^{-1} by 1/lam in every direction and keeps K positive
#: definite while a factor is still zero (B at init). docs/design.md section 4.
LAM = 0.1

METRICS = ("euclidean", "regulated")
NOISES = ("isotropic", "regulated")
CLIPPINGS = ("flat", "per_layer")


@dataclass(frozen=True)
class Mechanism:
    metric: str = "euclidean"
    noise: str = "isotropic"
    clipping: str = "flat"
    lam: float = LAM

    def __post_init__(self):
        for key, value, allowed in (("metric", self.metric, METRICS), ("noise", self.noise, NOISES),
                                    ("clipping", self.clipping, CLIPPINGS)):
            if value not in allowed:
                raise ValueError(f"mechanism {key} must be one of {allowed}, got {value!r}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"mechanism lam must be a finite number >= 0, got {self.lam!r}")

    @property
    def needs_gram(self) -> bool:
        """Whether the release needs K of the frozen factor (for the metric, the noise or both)."""
        return self.metric == "regulated" or self.noise == "regulated"

    @property
    def name(self) -> str:
        """The preset this mechanism is, with its non-default clipping and lam, e.g. 'regulated_metric'."""
        base = next((k for k, m in PRESETS.items() if (m.metric, m.noise) == (self.metric, self.noise)),
                    f"{self.metric}-metric/{self.noise}-noise")
        extra = ([self.clipping] if self.clipping != "flat" else []) + ([f"lam={self.lam:g}"] if self.needs_gram else [])
        return base + (f" ({', '.join(extra)})" if extra else "")

    def replace(self, **kw) -> "Mechanism":
        return dataclasses.replace(self, **kw)

    def validate(self, phase: str, frozen_at_start: bool = False) -> "Mechanism":
        """Check that this mechanism can run in `phase`. A regulated metric or noise needs a frozen
        factor: phase 'A' or 'B'. `frozen_at_start`: the caller fixes K from the factors' values at
        the start of the phase (the federated sub-round), which makes 'AB' sound too."""
        ref.check_phase(phase)
        if self.needs_gram and phase == "AB" and not frozen_at_start:
            raise ValueError(f"the {self.name} mechanism needs a frozen factor: use phase 'A' or 'B' (DEeR "
                             f"alternates them), or the isotropic mechanism for phase 'AB'")
        if self.needs_gram and self.lam == 0:
            import warnings
            warnings.warn(f"lam=0 with the {self.name} mechanism: K = frozen^T frozen is singular while a factor "
                          f"is zero (B at init); the step will fail there. lam={LAM} is the default.", stacklevel=3)
        return self

    def sensitivity(self, max_grad_norm: float | Sequence[float], n_tensors: int) -> float:
        """L2 sensitivity of the clipped sum: C (flat), sqrt(sum_l C_l^2) (per layer)."""
        if self.clipping == "flat":
            return float(max_grad_norm)
        return math.sqrt(sum(b * b for b in ref.per_layer_bounds(max_grad_norm, n_tensors)))

    @property
    def matched(self) -> bool:
        """Metric and noise agree (Euclidean clipping + isotropic noise, or regulated + regulated): the
        multiplier charged is the noise multiplier itself, whatever the grams."""
        return (self.metric, self.noise) in (("euclidean", "isotropic"), ("regulated", "regulated"))

    def effective_multiplier(self, noise_multiplier: float, grams: Sequence[torch.Tensor | None]) -> float:
        """The multiplier the accountant is charged for one release with noise std sigma * sensitivity
        (deer.reference.effective_multiplier: sigma when metric and noise agree)."""
        if noise_multiplier == 0:
            return 0.0
        return ref.effective_multiplier(noise_multiplier, self.metric, self.noise, grams)


PRESETS: dict[str, Mechanism] = {
    "isotropic": Mechanism("euclidean", "isotropic"),
    "regulated_metric": Mechanism("regulated", "regulated"),
    "regulated_paper": Mechanism("euclidean", "regulated"),
}
_ALIASES = {"regulated": "regulated_metric", "metric": "regulated_metric", "paper": "regulated_paper",
            "dp-sgd": "isotropic", "dpsgd": "isotropic"}
# the engine's shorthand (noise=, regulator=) -> preset
_SHORTHAND = {("isotropic", None): "isotropic", ("regulated", None): "regulated_metric",
              ("regulated", "metric"): "regulated_metric", ("regulated", "paper"): "regulated_paper"}


def mechanism(spec: "str | Mechanism | None" = None, *, noise: str | None = None, regulator: str | None = None,
              **overrides) -> Mechanism:
    """The one parser of privacy-mode spellings: a preset name (or alias: 'regulated' =
    'regulated_metric', 'paper' = 'regulated_paper'), an existing Mechanism, or the engine's
    shorthand noise='isotropic' | 'regulated' with regulator='metric' (default) | 'paper'; keyword
    overrides (clipping=, lam=) replace fields. None everywhere: isotropic."""
    if noise is not None or regulator is not None:
        if spec is not None:
            raise ValueError("give either mechanism= or the noise=/regulator= shorthand, not both")
        spec = _SHORTHAND.get((noise or "isotropic", regulator))
        if spec is None:
            raise ValueError(f"noise={noise!r}, regulator={regulator!r}: noise is 'isotropic' or 'regulated'; the "
                             f"regulator applies to noise='regulated' only ('metric': regulated clipping metric, "
                             f"sound; 'paper': Euclidean clipping, charged sigma / sigma_max)")
    if spec is None:
        m = PRESETS["isotropic"]
    elif isinstance(spec, Mechanism):
        m = spec
    elif isinstance(spec, str):
        key = _ALIASES.get(spec.lower(), spec.lower())
        if key not in PRESETS:
            raise ValueError(f"unknown privacy mechanism {spec!r}: choose from {sorted(PRESETS)} "
                             f"(or 'regulated' = 'regulated_metric', 'paper' = 'regulated_paper')")
        m = PRESETS[key]
    else:
        raise TypeError(f"mechanism must be a preset name or a deer.privacy.Mechanism, got {type(spec).__name__}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return m.replace(**overrides) if overrides else m
