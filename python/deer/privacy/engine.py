"""PrivacyEngine: private LoRA training in an existing PyTorch loop, the way Opacus does it.

The README's drop-in example (run by tests/test_readme.py) shows a whole loop: inject LoRA,
make_private, alternate engine.set_phase('B' / 'A'), optimizer.step() as usual.

What a step does (deer.privacy.release; docs/design.md sections 2-6): per-sample gradients of every
trained LoRA factor (from the (X, U, G) the LoRA layers captured in backward), their norm over all
LoRA layers in the chosen metric, clipping to `max_grad_norm`, the clipped sum, Gaussian noise
(isotropic, or regulated through the frozen factor) of std sigma * C, division by the expected
batch size, then the wrapped optimizer's step. The accountant is charged the multiplier the step
really had.

Mechanisms (deer.privacy.Mechanism; sample-level DP per client, Poisson sampling rate q):
    'isotropic'         (noise="isotropic")                      Euclidean clipping + isotropic
                        noise: DP-SGD, charged sigma.
    'regulated_metric'  (noise="regulated", regulator="metric")  clipping in the regulated metric +
                        regulated noise: a Gaussian mechanism in whitened coordinates, charged sigma.
    'regulated_paper'   (noise="regulated", regulator="paper")   Euclidean clipping + regulated noise
                        (the paper): charged the true multiplier sigma / max_l sigma_max(frozen_l).
Non-LoRA trainable parameters are rejected (their gradients would not be clipped): freeze them, or
make them LoRA targets (e.g. inject_lora(model, [..., "head"])).
"""
from __future__ import annotations

from collections import OrderedDict
import math
import os
import warnings
from typing import Sequence

import torch
import torch.nn as nn

from .. import reference as ref
from ..nn.inject import NoLoRALayersError, _require_lora, set_phase as _set_phase
from ..nn.from_peft import from_peft, is_peft_lora
from ..nn.lora import lora_units
from .accountant import DeerAccountant, noise_multiplier_for
from .mechanism import Mechanism, mechanism as _mechanism
from .release import FrozenMetric, NonFiniteRelease, per_sample_tensors, release


class PrivacyBudgetExceeded(RuntimeError):
    """The next private step would spend more than the target epsilon. Raised before the step."""


# ------------------------------------------------------------------------------------------------
# The DP optimizer
# ------------------------------------------------------------------------------------------------

class DPLoRAOptimizer(torch.optim.Optimizer):
    """Wraps a torch optimizer; `step()` replaces the LoRA gradients by their private version first.

    Between two steps any number of backward calls may run (gradient accumulation over physical
    batches of one logical Poisson batch): the captured chunks are stacked and the DP step happens
    once. `zero_grad()` clears grads and captures. Attributes after a step: `nonfinite_samples`
    (total samples dropped for NaN/Inf gradients), `last_step` (norms, clip fraction, multiplier)."""

    def __init__(self, optimizer: torch.optim.Optimizer, engine: "PrivacyEngine"):
        # Deliberately no super().__init__: param_groups/state/defaults are the wrapped optimizer's.
        self.original_optimizer = optimizer
        self._engine = engine
        # the hook registries torch.optim.Optimizer.__init__ would create (LR schedulers, profilers)
        for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, attr, OrderedDict())
        self.nonfinite_samples = 0
        self.steps_taken = 0
        self._skip = self._skipped = False   # signal_skip_step
        self._probed = False   # the first step with samples checks that every LoRA branch reached the loss
        self.last_step: dict = {}

    @property
    def engine(self) -> "PrivacyEngine":
        """The PrivacyEngine that made this optimizer (its accountant, get_epsilon, set_phase)."""
        return self._engine

    # --- delegation, so schedulers and checkpoints see the wrapped optimizer ---------------------
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, v):
        self.original_optimizer.param_groups = v

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, sd):
        self.original_optimizer.load_state_dict(sd)

    def add_param_group(self, group):
        self.original_optimizer.add_param_group(group)

    def __repr__(self):
        return f"DPLoRAOptimizer({self.original_optimizer!r})"

    # torch.amp.GradScaler hands itself to step() (grad_scaler=) instead of unscaling first: refused there
    _step_supports_amp_scaling = True

    @property
    def noise_multiplier(self) -> float:
        return self._engine.noise_multiplier

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Opacus' virtual-batch protocol (opacus.utils.batch_memory_manager.BatchMemoryManager): the
        next step() and zero_grad() keep the captured physical batch, so the logical batch is clipped,
        noised and charged once, at its last physical batch."""
        self._skip = bool(do_skip)

    def zero_grad(self, set_to_none: bool = True):
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        if not self._skipped:
            for _, u in self._engine._units:
                u.clear_captured()
        self._skipped = False

    # --- the private step -----------------------------------------------------------------------
    def pre_step(self) -> None:
        """Compute the private gradients of the trained LoRA factors into .grad and charge the
        accountant (raises PrivacyBudgetExceeded before anything when the budget would be exceeded)."""
        e = self._engine
        units = e._units
        if not units:
            units = _require_lora(e.module, "DP step")   # raises, naming the problem
        _refuse_batchnorm_training(e.module)
        phase = {u.phase for _, u in units}
        if len(phase) != 1:
            raise ValueError(f"LoRA layers are in different phases {sorted(phase)}; use engine.set_phase()")
        phase = phase.pop()
        metric = e._frozen_metric(units, phase)

        # The multiplier this step really has, and the budget check: before touching anything.
        eff = metric.effective_multiplier(e.noise_multiplier)
        if e.target_epsilon is not None:
            if eff <= 0 or e.accountant.would_exceed(e.target_epsilon, e.target_delta, eff, e.sample_rate):
                raise PrivacyBudgetExceeded(
                    f"the next step (noise multiplier {eff:.4g}, sample rate {e.sample_rate:.4g}) would bring "
                    f"epsilon above target_epsilon={e.target_epsilon} (delta={e.target_delta}); spent so far "
                    f"{e.get_epsilon(e.target_delta):.4g} after {self.steps_taken} steps. Stop training, or start "
                    f"a new run with a larger budget or noise multiplier. No step was taken.")

        tensors = per_sample_tensors(units, [u.pop_captured() for _, u in units], metric, e.loss_reduction,
                                     e.backend)
        if not self._probed and any(t.grads is not None for t in tensors):
            _refuse_unreached(tensors)
            self._probed = True
        updates = None
        if e.fused_update:   # the optimizer's step happens inside the kernel, element by element
            from ..ops import FusedUpdate
            opt = self.original_optimizer
            group_of = {id(p): g for g in opt.param_groups for p in g["params"]}   # one pass, not one per factor
            updates = [FusedUpdate.from_optimizer(opt, t.param, group_of.get(id(t.param))) for t in tensors]
        try:
            rel = release(tensors, e.mechanism, noise_multiplier=e.noise_multiplier, max_grad_norm=e.max_grad_norm,
                          expected_batch_size=e.expected_batch_size, seed=e._step_seed(), step=e._step_counter,
                          client=e.client, backend=e.backend, effective_multiplier=eff, updates=updates)
        except NonFiniteRelease as err:
            if not updates:
                raise
            # A fused step has run: its kernels skipped every non-finite element, but the finite ones
            # reached the weights, so this release is spent and charged.
            self._charge(eff)
            raise NonFiniteRelease(f"{err} The fused optimizer step left those elements (and their optimizer state) "
                                   f"unchanged, stepped the finite ones, and this step was charged to the "
                                   f"accountant.") from None
        if rel.dropped_nonfinite:
            self.nonfinite_samples += rel.dropped_nonfinite
        for t, out in zip(tensors, rel.grads):
            t.param.grad = None if updates else out.to(t.param.dtype)
        for _, u in units:
            for f in ("A", "B"):
                if f not in metric.factors:
                    u.factor(f).grad = None

        self._charge(eff)
        clipped = None
        if rel.batch_size > 0:
            clipped = float((torch.stack(rel.clip) < 1).any(0).float().mean())
        self.last_step = {"batch_size": rel.batch_size, "noise_multiplier_effective": eff,
                          "sensitivity": rel.sensitivity, "noise_std": rel.noise_std, "clipped_fraction": clipped,
                          "dropped_nonfinite": rel.dropped_nonfinite, "per_sample_norms": rel.per_sample_norms}

    def _charge(self, eff: float) -> None:
        """Charge one release with multiplier eff and move the noise key to the next step."""
        e = self._engine
        if eff > 0:
            e.accountant.step(noise_multiplier=eff, sample_rate=e.sample_rate)
        else:   # no noise: not private at all; get_epsilon reports inf from now on
            e.unaccounted_steps += 1
        e._step_counter += 1
        self.steps_taken += 1

    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None):
        if grad_scaler is not None and grad_scaler.is_enabled():
            raise RuntimeError("deer cannot train under a GradScaler: the scaled loss scales every per-sample "
                               "gradient, so clipping to max_grad_norm would clip the wrong norm. Use bf16 "
                               "autocast (no scaler) or fp32; no step was taken.")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._skipped, self._skip = self._skip, False
        if self._skipped:   # a physical batch of a larger logical one: nothing released yet
            return loss
        self.pre_step()
        self.original_optimizer.step()
        return loss


def _swap_replaced(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Units from_peft built with new Parameters (a FullLinear's B = [W | b], a conv LoRA's 2-D views of
    peft's factors) keep peft's originals in `replaced`: put the unit's Parameters in the optimizer
    group that held them, and drop peft's."""
    for name, u in lora_units(module):
        old = getattr(u, "replaced", None)
        if not old:
            continue
        ids = {id(p) for p in old}
        if any(p in optimizer.state and optimizer.state[p] for p in old):
            raise ValueError(f"make_private: the optimizer already holds state for {name!r}, whose tensors deer "
                             f"replaces (a module trained fully, or a conv LoRA): build the optimizer after "
                             f"make_private, or before any step")
        for g in optimizer.param_groups:
            had = any(id(p) in ids for p in g["params"])
            g["params"] = [p for p in g["params"] if id(p) not in ids]
            if had:
                g["params"] += [u.factor(f) for f in u.trainable]
        u.replaced = None


def _refuse_token_mean_loss(module, args, out) -> None:
    """A forward hook on the private model: refuse a loss the model computed itself over token-level
    logits (a transformers ModelOutput with .loss and (b, T, V) .logits: causal and masked LMs, token
    classifiers). transformers averages it over all tokens of the batch, so sample i's gradient is
    scaled by n_i / N, N the batch's token count: it depends on the other samples' lengths and the
    clipping bound the accountant charges no longer holds for it (docs/privacy.md)."""
    loss, logits = getattr(out, "loss", None), getattr(out, "logits", None)
    if (isinstance(loss, torch.Tensor) and loss.requires_grad and isinstance(logits, torch.Tensor)
            and logits.dim() >= 3):
        raise ValueError(f"deer: {type(module).__name__} computed its own loss (out.loss, labels= was passed) over "
                         f"token-level logits of shape {tuple(logits.shape)}. transformers averages that loss over "
                         f"all tokens of the batch, so one sample's gradient depends on the other samples' lengths "
                         f"and the clipping bound does not hold. Call the model without labels= and train on "
                         f"deer.losses.causal_lm_loss(out.logits, labels) (each sample's mean over its own tokens; "
                         f"shift=False for masked LMs and token classifiers) with loss_reduction='mean'.")


def _refuse_batchnorm_training(module: nn.Module) -> None:
    """BatchNorm in training mode normalises each sample with its batch's statistics: every sample's
    gradient then depends on the other samples, and the sensitivity bound of the sum does not hold."""
    bn = [n or type(m).__name__ for n, m in module.named_modules()
          if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if bn:
        raise ValueError(f"deer: BatchNorm layer(s) {bn[:5]}{' ...' if len(bn) > 5 else ''} are in training mode: their "
                         f"batch statistics mix the samples of a batch, so no gradient is per-sample and clipping "
                         f"does not bound a record's influence. Put them in eval mode after model.train() "
                         f"(for m in model.modules(): if isinstance(m, torch.nn.modules.batchnorm._BatchNorm): "
                         f"m.eval()), or replace them with GroupNorm. No step was taken and nothing was charged.")


def _refuse_unreached(tensors) -> None:
    """On the first step with samples every trained LoRA factor must have captured them: a branch that
    never ran in forward, or whose output never reached the loss, would be trained on noise alone,
    spending the budget for nothing, without a word."""
    dead = sorted({t.name.rpartition(".lora_")[0] for t in tensors if t.grads is None})
    if dead:
        seen = next(t.grads.shape[0] for t in tensors if t.grads is not None)
        raise ValueError(f"deer: the LoRA layer(s) {dead} received no gradient in this step while the others saw "
                         f"{seen} samples: their branch is not on the forward path (a parent module reads their "
                         f".weight directly, as nn.MultiheadAttention's forward does with out_proj), or their output "
                         f"does not reach the loss. Training them would spend privacy budget on noise alone. Remove "
                         f"them from target_modules. No step was taken and nothing was charged.")


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------

class PrivacyEngine:
    """Opacus-like entry point: `make_private` returns (model, optimizer, data_loader); `get_epsilon`
    reads the accountant; `set_phase` switches DEeR phases.

    accountant: 'rdp' (Opacus' RDP accountant) or 'prv' (Opacus' PRV accountant).
    secure_mode: noise keys and Poisson sampling seeded from OS entropy at every step (runs are not
      reproducible). torch's Gaussian generator itself is not a CSPRNG; see the README."""

    def __init__(self, accountant: str = "rdp", secure_mode: bool = False):
        self.accountant = DeerAccountant(mechanism=accountant)
        self.accountant_mechanism = accountant
        self.secure_mode = bool(secure_mode)
        self.module: nn.Module | None = None
        self.optimizer: DPLoRAOptimizer | None = None
        self._step_counter = 0
        self.unaccounted_steps = 0   # steps taken with noise_multiplier = 0 (not private)
        self.fused_update = False

    # ------------------------------------------------------------------------------------------
    def make_private(self, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader=None, *,
                     max_grad_norm: float | Sequence[float], noise_multiplier: float | None = None,
                     target_epsilon: float | None = None, target_delta: float | None = None,
                     epochs: int | None = None, steps: int | None = None,
                     mechanism: Mechanism | str | None = None, clipping: str | None = None,
                     noise: str | None = None, regulator: str | None = None, lam: float | None = None,
                     poisson_sampling: bool = True, phase: str | None = None, seed: int | None = None,
                     backend: str | None = None, loss_reduction: str = "mean", client: int = 0,
                     sample_rate: float | None = None, expected_batch_size: float | None = None,
                     fused_update: bool = False):
        """Make LoRA training of `module` private. Returns (module, DPLoRAOptimizer, data_loader).

        module: a model with LoRA layers (deer.nn.inject_lora); every trainable parameter must be a
          LoRA factor. optimizer: any torch optimizer over the LoRA factors.
        data_loader: replaced by a Poisson-sampling loader (Opacus' DPDataLoader) when
          poisson_sampling; sample rate 1 / len(data_loader). Without a loader pass sample_rate and
          expected_batch_size (e.g. a federated client that samples its own batches).
        noise_multiplier, or target_epsilon + target_delta + epochs (or steps): sigma is then
          calibrated by the accountant. With target_epsilon the engine raises PrivacyBudgetExceeded
          before any step that would exceed it (also when noise_multiplier is given explicitly).
        max_grad_norm: C (flat), or per-tensor bounds for clipping='per_layer' (a scalar is split
          as C / sqrt(L) so the total sensitivity is C).
        mechanism: a deer.privacy.Mechanism or a preset name ('isotropic' default, 'regulated_metric',
          'regulated_paper'); or the shorthand noise='isotropic' | 'regulated' with regulator='metric'
          (default, sound) | 'paper'. clipping ('flat' | 'per_layer') and lam (ridge of K = frozen^T
          frozen + lam I, default deer.privacy.mechanism.LAM = 0.1) override the mechanism's.
        phase: 'A' | 'B' | 'AB' (default 'B' for regulated noise, which needs a frozen factor; 'AB'
          otherwise). seed: noise key seed (default: OS entropy). client: noise key component.
        loss_reduction: 'mean' (the loss averages over the physical batch) or 'sum'.
        fused_update: the optimizer (torch.optim SGD, Adam or AdamW, fp32 LoRA factors) steps each
          factor inside the clip/noise kernel, where it writes the private gradient, instead of a
          second pass through .grad; the LoRA factors' .grad stays None. Same result, same optimizer
          state dict (fused and unfused runs can resume each other).
        """
        mech = _mechanism(mechanism, noise=noise, regulator=regulator, clipping=clipping, lam=lam)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if isinstance(max_grad_norm, (int, float)):
            if not max_grad_norm > 0:
                raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        elif mech.clipping != "per_layer":
            raise ValueError("a list of max_grad_norm bounds needs clipping='per_layer'")
        elif any(not c > 0 for c in max_grad_norm):
            raise ValueError(f"every per-layer bound must be > 0, got {list(max_grad_norm)}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DPLoRAOptimizer):
            raise ValueError("this optimizer is already private; pass the original optimizer")

        if fused_update:   # refuse an unsupported optimizer now, not at the first step
            from ..ops import FusedUpdate
            for g in optimizer.param_groups:
                if g["params"]:
                    FusedUpdate.from_optimizer(optimizer, g["params"][0])

        if not lora_units(module) and is_peft_lora(module):
            from_peft(module)     # a peft model: its LoRA layers become deer's, sharing the tensors
            _swap_replaced(module, optimizer)
        units = _require_lora(module, "make_private")
        phase = phase or ("B" if mech.needs_gram else _current_phase(units))
        mech.validate(phase)
        lora_params = {id(p) for _, u in units for p in (u.lora_A, u.lora_B)}
        # every trainable parameter must be a LoRA factor, or its gradient would escape clipping
        _set_phase(module, phase)
        others = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in lora_params]
        if others:
            raise ValueError(f"make_private: {len(others)} trainable parameters are not LoRA factors and would "
                             f"not be clipped or noised: {others[:8]}{' ...' if len(others) > 8 else ''}. "
                             f"Freeze them (p.requires_grad_(False)) or make their modules LoRA targets "
                             f"(e.g. inject_lora(model, [..., 'head'])).")

        # Sampling: Poisson via Opacus' DPDataLoader, sample rate 1 / len(loader).
        if data_loader is not None:
            if isinstance(data_loader.dataset, torch.utils.data.IterableDataset):
                raise ValueError("make_private: the data loader's dataset is an IterableDataset; the sample rate the "
                                 "accountant charges (and Poisson sampling) needs a map-style Dataset with a length")
            n_data = len(data_loader.dataset)
            if poisson_sampling:
                from opacus.data_loader import DPDataLoader
                gen = torch.Generator()
                gen.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
                                if (self.secure_mode or seed is None) else int(seed) + 1)
                data_loader = DPDataLoader.from_data_loader(data_loader, generator=gen)
                sample_rate = data_loader.sample_rate
                expected_batch_size = sample_rate * n_data
            else:
                bs = data_loader.batch_size
                if bs is None:
                    raise ValueError("poisson_sampling=False needs a data loader with a fixed batch_size")
                sample_rate, expected_batch_size = bs / n_data, float(bs)
                warnings.warn("poisson_sampling=False: the accountant assumes Poisson sampling at rate "
                              "batch_size / len(dataset); shuffled fixed-size batches only approximate it.")
            steps_per_epoch = len(data_loader)
        else:
            if sample_rate is None or expected_batch_size is None:
                raise ValueError("without a data_loader pass sample_rate and expected_batch_size")
            steps_per_epoch = max(1, round(1 / sample_rate))
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")

        if target_epsilon is not None:
            if target_delta is None:
                raise ValueError("target_epsilon needs target_delta")
            if not target_epsilon > 0:
                raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
        if noise_multiplier is None:
            if target_epsilon is None:
                raise ValueError("give noise_multiplier, or target_epsilon + target_delta + epochs (or steps)")
            if steps is None:
                if epochs is None:
                    raise ValueError("target_epsilon needs epochs (or steps) to calibrate the noise")
                steps = int(epochs * steps_per_epoch)
            noise_multiplier = noise_multiplier_for(target_epsilon, target_delta, sample_rate, steps,
                                                    self.accountant_mechanism)
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if noise_multiplier == 0:
            warnings.warn("noise_multiplier=0: steps are clipped but not noised and are NOT differentially "
                          "private; get_epsilon() will report inf (useful for debugging and tests only)")

        self.module = module
        module.register_forward_hook(_refuse_token_mean_loss)
        # The LoRA units as make_private found them, found again by set_phase (LoRA layers injected later
        # join there): walking every module of a ViT twice per step cost ~1 ms on a CPU.
        self._units = list(units)
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = max_grad_norm
        self.target_epsilon, self.target_delta = target_epsilon, target_delta
        self.mechanism = mech
        self.sample_rate, self.expected_batch_size = float(sample_rate), float(expected_batch_size)
        self.loss_reduction, self.backend, self.client = loss_reduction, backend, int(client)
        self.fused_update = bool(fused_update)
        self.seed = int.from_bytes(os.urandom(8), "little") & ((1 << 62) - 1) if seed is None else int(seed)
        for _, u in units:
            u.clear_captured()
            u.capture = True
            u.capture_lean = True
        self.optimizer = DPLoRAOptimizer(optimizer, self)
        self._metric = FrozenMetric(self._units, phase, mech)
        self._sync_optimizer()
        return module, self.optimizer, data_loader

    def make_private_with_epsilon(self, module, optimizer, data_loader, *, target_epsilon, target_delta, epochs, **kw):
        """Opacus' spelling of make_private(target_epsilon=, target_delta=, epochs=)."""
        return self.make_private(module, optimizer, data_loader, target_epsilon=target_epsilon,
                                 target_delta=target_delta, epochs=epochs, **kw)

    # ------------------------------------------------------------------------------------------
    def _step_seed(self) -> int:
        if self.secure_mode:
            return int.from_bytes(os.urandom(8), "little") & ((1 << 62) - 1)
        return self.seed

    def set_phase(self, phase: str) -> None:
        """Switch the DEeR phase: freeze the other factor, make the regulator use it, put the newly
        trained factor in the optimizer and reset the optimizer state of all LoRA factors (moments
        built while the other factor was different do not carry over)."""
        ref.check_phase(phase)
        if self.module is None:
            raise NoLoRALayersError("PrivacyEngine.set_phase before make_private: inject LoRA "
                                    "(deer.nn.inject_lora) and call engine.make_private(...) first")
        self.mechanism.validate(phase)
        _set_phase(self.module, phase)
        self._units = lora_units(self.module)
        self._metric = FrozenMetric(self._units, phase, self.mechanism)
        self._sync_optimizer(reset_state=True)

    def _frozen_metric(self, units, phase: str) -> FrozenMetric:
        """The phase's FrozenMetric (K and its Cholesky factor per trained factor), built when the phase
        was set; built anew when the phase was switched without engine.set_phase."""
        m = self._metric
        if m.phase != phase or m._units != list(units):
            m = self._metric = FrozenMetric(units, phase, self.mechanism)
        else:
            m.refresh()
        return m

    def _sync_optimizer(self, reset_state: bool = False):
        opt = self.optimizer.original_optimizer
        units = self._units
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        lora = [p for _, u in units for p in (u.lora_A, u.lora_B)]
        missing = [p for p in lora if p.requires_grad and id(p) not in held]
        if missing:
            # join the group that already holds LoRA factors (same lr, weight decay, ...)
            group = next((g for g in opt.param_groups if any(id(p) in {id(q) for q in lora} for p in g["params"])),
                         opt.param_groups[0])
            group["params"].extend(missing)
        if reset_state:
            for p in lora:
                opt.state.pop(p, None)
        for _, u in units:
            u.clear_captured()
        for p in lora:
            p.grad = None

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at `delta` (inf once a step ran without noise)."""
        if self.unaccounted_steps:
            return math.inf
        return float(self.accountant.get_epsilon(delta))

    def state_dict(self):
        return {"accountant": self.accountant.state_dict(), "step": self._step_counter,
                "unaccounted_steps": self.unaccounted_steps,
                "seed": self.seed if not self.secure_mode else None}

    def load_state_dict(self, state):
        self.accountant.load_state_dict(state["accountant"])
        self._step_counter = int(state["step"])
        self.unaccounted_steps = int(state.get("unaccounted_steps", 0))
        if state.get("seed") is not None:
            self.seed = int(state["seed"])


def _current_phase(units) -> str:
    phases = {u.phase for _, u in units}
    return phases.pop() if len(phases) == 1 else "AB"


def make_private(module: nn.Module, optimizer: torch.optim.Optimizer, data_loader=None, *, accountant: str = "rdp",
                 secure_mode: bool = False, **kwargs):
    """One-call form: PrivacyEngine(accountant, secure_mode).make_private(...). Returns (module,
    optimizer, data_loader); the engine is `optimizer.engine` (get_epsilon, set_phase, accountant)."""
    return PrivacyEngine(accountant=accountant, secure_mode=secure_mode).make_private(
        module, optimizer, data_loader, **kwargs)
