"""Every site's reply is untrusted input: one check, run by the one round loop for both transports.

A reply is accepted only if it is exactly what the server asked for in that sub-round: the trained
factor(s) of every LoRA layer and nothing else, each a tensor of the global adapters' shape and
dtype, all finite; an example count that is a positive finite number, capped at the size of the
site's partition (the server builds the same partitions from the job, so it knows them); and, at
sample level, a release report consistent with the job's config (the site's sample rate, its number
of local steps and, where the mechanism's metric and noise agree, the noise multiplier the server
sent). A reply that fails is left out of the sub-round with one reason naming the site and the
field; it never raises.

What this protects against: a site that crashes the server's round with a malformed reply, steers
the mean with an inflated example count, replaces layers it did not send, or misreports its releases
into the server's journal. What it does not: a site that sends a well-formed update computed from
anything it likes (poisoning). At client level that update is clipped to C like every other and its
influence is bounded by C / (q N); without client-level DP, the mean weights it like an honest site
of its size. This is not Byzantine-robust aggregation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import reference as ref
from ..nn import LoRAState, lora_key


class Rejected(ValueError):
    """Why a reply is left out (one line, naming the field)."""


@dataclass
class Expected:
    """What the server sent in one sub-round and what an honest reply to it looks like."""
    factors: dict[str, torch.Tensor]          # name -> the global value of every trained factor
    max_examples: int                         # the site's partition size
    sample_rate: float | None = None          # sample level: the site's q
    steps: int | None = None                  # sample level: its local steps in the sub-round
    sigma: float | None = None                # sample level: the multiplier when it is what is charged


def expected(global_state: LoRAState, phase: str, partition_size: int, *, sample_rate: float | None = None,
             steps: int | None = None, sigma: float | None = None) -> Expected:
    want = {k: t for k, t in global_state.items() if lora_key(k)[1] in ref.trained_factors(phase)}
    return Expected(want, partition_size, sample_rate, steps, sigma)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def check_releases(releases, exp: Expected) -> list[tuple[float, float, int]]:
    """A sample-level release report as [(sigma, q, steps)], or Rejected."""
    if not isinstance(releases, (list, tuple)):
        raise Rejected(f"releases: a {type(releases).__name__}, not a list of (sigma, q, steps)")
    if not releases:
        raise Rejected("releases: missing (a sample-level reply must report its releases)")
    out = []
    for r in releases:
        if not isinstance(r, (list, tuple)) or len(r) != 3:
            raise Rejected(f"releases: {str(r)[:60]!r} is not a (sigma, q, steps) triple")
        s, q, k = r
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in (s, q)):
            raise Rejected(f"releases: {str(r)[:60]!r} is not a (sigma >= 0, 0 < q <= 1, steps >= 1) triple")
        if not _close(float(q), exp.sample_rate):
            raise Rejected(f"releases: sample rate {q} differs from the job's {exp.sample_rate:.6g} for this site")
        if exp.sigma is not None and not _close(float(s), exp.sigma):
            raise Rejected(f"releases: noise multiplier {s} differs from the {exp.sigma:.6g} the server sent")
        if float(s) < 0:
            raise Rejected(f"releases: noise multiplier {s} is negative")
        out.append((float(s), float(q), int(k)))
    if sum(k for *_, k in out) != exp.steps:
        raise Rejected(f"releases: {sum(k for *_, k in out)} steps reported, the job's config gives this site "
                       f"{exp.steps} per sub-round")
    return out


def check_update(adapters, num_examples, exp: Expected) -> tuple[LoRAState, float, str | None]:
    """(the trained factors, the example count to weight by, a note if it was capped), or Rejected."""
    if not isinstance(adapters, dict):
        raise Rejected(f"factors: a {type(adapters).__name__}, not a mapping of tensors")
    missing = sorted(set(exp.factors) - set(adapters))
    extra = sorted(set(adapters) - set(exp.factors))
    if missing or extra:
        raise Rejected(f"factors: {len(missing)} missing (e.g. {missing[:3]}), {len(extra)} not asked for "
                       f"(e.g. {extra[:3]}); a reply carries exactly the trained factor(s) of every LoRA layer")
    for k, want in exp.factors.items():
        got = adapters[k]
        if not isinstance(got, torch.Tensor):
            raise Rejected(f"factors: {k} is a {type(got).__name__}, not a tensor")
        if got.shape != want.shape or got.dtype != want.dtype:
            raise Rejected(f"factors: {k} is {tuple(got.shape)} {got.dtype}, the server sent {tuple(want.shape)} "
                           f"{want.dtype}")
        if not torch.isfinite(got).all():
            raise Rejected(f"factors: {k} has NaN/Inf entries")
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)) \
            or not math.isfinite(num_examples) or not num_examples > 0:
        raise Rejected(f"num-examples: {num_examples!r} is not a positive finite number")
    note = None
    if num_examples > exp.max_examples:
        note = f"num-examples {num_examples:g} capped at its partition's {exp.max_examples}"
        num_examples = exp.max_examples
    return {k: adapters[k] for k in exp.factors}, float(num_examples), note


def bound_update(factors: LoRAState, exp: Expected, bound: float) -> tuple[LoRAState, str | None]:
    """The update (factors minus what the server sent) scaled down to Euclidean norm `bound` if it is
    larger, and a note saying so. Post-processing of what the site released: it costs no privacy. It
    bounds how far one well-formed update moves the mean (at most bound times its weight); it does not
    detect a poisoned update below the bound."""
    delta = {k: factors[k].double() - exp.factors[k].double() for k in exp.factors}
    # the norm of delta / s times s, s its largest entry: no finite update overflows to inf
    s = max((float(d.abs().max()) for d in delta.values() if d.numel()), default=0.0)
    if not s > 0:
        return factors, None
    norm = s * math.sqrt(sum(float(((d / s) ** 2).sum()) for d in delta.values()))
    if norm <= bound:
        return factors, None
    c = bound / norm
    out = {k: (exp.factors[k].double() + c * d).to(exp.factors[k].dtype) for k, d in delta.items()}
    return out, f"update norm {norm:.3g} scaled to update_norm_bound={bound:g}"
