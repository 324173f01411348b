"""Shared builders for the end-to-end benchmark (bench/bench_step.py), its report and the fairness test.

Every compared method trains the *same* LoRA parameters of the *same* frozen model on the *same*
batch. Models (`Case.arch`): a timm ViT classifying random images (cross-entropy), or a decoder LM, a
tiny HF Llama or a GPT-2-shaped HF model (transformers' Conv1D layers, fused c_attn), on random token
sequences with right padding and the causal LM loss, each sample's loss the mean over its own valid
tokens (deer.losses.causal_lm_loss, through `CausalLMLoss`). A case is described by a `Case`;
`build_step(case)` returns a zero-argument callable that runs one full training step (forward,
backward, per-sample clipping, noise, optimizer step) and the state it needs. Methods:

    nonprivate      LoRA with deer's LoRALinear, plain backward + SGD: the floor
    peft            LoRA with peft's LoRA layers (get_peft_model), plain backward + SGD: the second
                    floor, the non-private LoRA people run today
    deer            deer's DP step (backend = cpu | cuda | triton | reference),
                    noise 'isotropic' (Euclidean clipping, standard DP-SGD) or
                    'regulated' (regulated-metric clipping + low-cost regulated noise, deer's default)
    opacus_hooks    Opacus 1.6 GradSampleModule (grad_sample_mode='hooks') + DPOptimizer
    opacus_ghost    Opacus 1.6 ghost clipping (grad_sample_mode='ghost': two backward passes)
    deer_on_opacus  Opacus hooks clipping + the paper's regulated noise as the authors' code does it:
                    a full (m x n) Gaussian draw and a pseudo-inverse of the frozen factor per layer
                    per step

peft's layers wrap the same frozen base modules and get the same A and B values as deer's.
For Opacus the LoRA factors are plain nn.Linear modules (`OpacusLoRALinear`) so Opacus can compute
their per-sample gradients; parameters are copied from the deer model, so both hold identical values.
Phases follow deer: 'A' trains A (B frozen), 'B' trains B (A frozen). B is given random (non-zero)
values, as it has after a few rounds of training, so that the A phase has non-zero gradients and the
regulated metric of the A phase is well conditioned.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

from deer import reference as ref
from deer.losses import causal_lm_loss
from deer.nn import LoRAConfig, LoRALinear, inject_lora, lora_layers
from deer.nn.inject import replace_module
from deer.ops import resolve_backend

# timm ViT sizes (embed dim, depth, heads): the ViT-Ti/S/B of "How to train your ViT", built with timm's
# VisionTransformer class so nothing is downloaded. mlp_ratio 4, patch 16 unless a case says otherwise.
VIT_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}
# Decoder LMs built from a config (random init, nothing downloaded). "tiny" Llama: 4 layers of width
# 256 with grouped-query attention (4 query heads, 2 key/value heads); the GPT-2-shaped model has
# GPT-2's layout (Conv1D projections, fused c_attn, learned positions) at the same width and depth.
# Both have an 8192-token vocabulary and no dropout; `Case.depth` overrides the number of layers.
DECODER_SIZES = {
    "llama": {"tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=8192, max_position_embeddings=512)},
    "gpt2": {"tiny": dict(n_embd=256, n_layer=4, n_head=4, vocab_size=8192, n_positions=512,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)},
}
METHODS = ("nonprivate", "peft", "deer", "opacus_hooks", "opacus_ghost", "deer_on_opacus")
# LoRA targets per architecture (suffixes of module names; "attn": the attention projections)
LORA_TARGETS = {
    "vit": {"qkv": ("attn.qkv",), "qkv_proj": ("attn.qkv", "attn.proj"),
            "all": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")},
    "llama": {"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")},
    "gpt2": {"attn": ("attn.c_attn", "attn.c_proj")},
}
NUM_CLASSES = 10

# When True (the report's profiler run), every step labels its stages so a profile says where the time
# goes: "forward" (model + loss), "backward" (all backward passes, hooks and captures included) and
# "step" (per-sample norms, clipping, noise and the optimizer update: the DP work outside autograd).
PROFILE_STAGES = False


def stage(name: str):
    return torch.profiler.record_function(name) if PROFILE_STAGES else contextlib.nullcontext()


@dataclass(frozen=True)
class Case:
    method: str
    model: str = "tiny"
    batch: int = 32
    img: int = 64                   # ViT image size (0 for decoders)
    rank: int = 8
    phase: str = "B"
    noise: str = "isotropic"        # isotropic | regulated | paper (deer_on_opacus) | none (nonprivate)
    backend: str = "-"              # deer backend; '-' for the others
    targets: str = "qkv"
    depth: int | None = None        # override the ViT depth (quick runs)
    patch: int = 16
    device: str = "cpu"
    sigma: float = 1.0
    max_grad_norm: float = 1.0
    lam: float = 1e-2
    fused: bool = False             # deer: make_private(fused_update=True), the optimizer step in the kernel
    arch: str = "vit"               # vit | llama | gpt2
    seq: int = 0                    # decoders: tokens per sequence (before padding)

    @property
    def tokens(self) -> int:
        return self.seq if self.arch != "vit" else (self.img // self.patch) ** 2 + 1

    def config_id(self) -> str:
        """The configuration (model, shapes, LoRA, phase) without the method: the benchmark group."""
        d = f"-d{self.depth}" if self.depth is not None else ""
        shape = f"img{self.img}" if self.arch == "vit" else f"T{self.seq}"
        arch = "" if self.arch == "vit" else f"{self.arch}-"
        return f"{self.device}-{arch}{self.model}{d}-b{self.batch}-{shape}-r{self.rank}-{self.targets}-{self.phase}"

    def id(self) -> str:
        meth = self.method if self.backend == "-" else f"{self.method}[{self.backend}]"
        return f"{self.config_id()}-{meth}-{self.noise}" + ("-fused" if self.fused else "")

    def as_row(self) -> dict:
        row = asdict(self)
        row["tokens"] = self.tokens
        return row


def device_name(device: str = "cpu") -> str:
    """The device a benchmark ran on, for its results: the GPU's name, or the CPU model from
    /proc/cpuinfo (platform's processor or machine where that file is missing)."""
    import platform
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        model = None
    return model or platform.processor() or platform.machine()


def write_results(out_dir: str, name: str, meta: dict, rows: list[dict], table: list[str]) -> None:
    """A standalone benchmark's results: <name>.json ({"meta", "rows"}) and the markdown table
    <name>.md in out_dir (created), the table also printed."""
    import json
    import os
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def build_vit(model: str, img: int, depth: int | None = None, patch: int = 16, seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    if model not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {model!r}; choose one of {tuple(VIT_SIZES)}")
    if img % patch:
        raise ValueError(f"image size {img} must be a multiple of the patch size {patch}")
    cfg = dict(VIT_SIZES[model])
    if depth is not None:
        cfg["depth"] = depth
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=img, patch_size=patch, num_classes=NUM_CLASSES, mlp_ratio=4.0, **cfg)
    for p in vit.parameters():
        p.requires_grad_(False)
    return vit


def build_decoder(arch: str, model: str, depth: int | None = None, seed: int = 0) -> nn.Module:
    """A frozen decoder LM of DECODER_SIZES[arch][model] (random init, no dropout; training mode, as
    Opacus requires)."""
    import transformers
    if arch not in DECODER_SIZES or model not in DECODER_SIZES[arch]:
        raise ValueError(f"unknown decoder {arch!r} size {model!r}; choose one of "
                         f"{[(a, m) for a in DECODER_SIZES for m in DECODER_SIZES[a]]}")
    cfg = dict(DECODER_SIZES[arch][model])
    torch.manual_seed(seed)
    if arch == "llama":
        if depth is not None:
            cfg["num_hidden_layers"] = depth
        lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    else:
        if depth is not None:
            cfg["n_layer"] = depth
        lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm


def build_base(case: Case) -> nn.Module:
    """The frozen model of `case`, before LoRA."""
    if case.arch == "vit":
        return build_vit(case.model, case.img, case.depth, case.patch)
    return build_decoder(case.arch, case.model, case.depth)


def lora_targets(case: Case) -> tuple[str, ...]:
    by_arch = LORA_TARGETS.get(case.arch)
    if by_arch is None:
        raise ValueError(f"unknown architecture {case.arch!r}; choose one of {tuple(LORA_TARGETS)}")
    if case.targets not in by_arch:
        raise ValueError(f"unknown LoRA targets {case.targets!r} for {case.arch}; choose one of {tuple(by_arch)}")
    return by_arch[case.targets]


def inject_deer_lora(model: nn.Module, rank: int, targets: tuple[str, ...], seed: int = 1) -> list[LoRALinear]:
    """deer.nn.inject_lora on the target layers (one LoRALinear each, a fused qkv / c_attn included;
    alpha = 2 r, A drawn from `seed`). B gets random values (std 1/sqrt(m)) so both phases are
    non-trivial, as after a few rounds of training."""
    inject_lora(model, LoRAConfig(targets, r=rank, alpha=2 * rank, qkv_slices=None), seed=seed)
    g = torch.Generator().manual_seed(seed)
    layers = lora_layers(model)
    with torch.no_grad():
        for lyr in layers:
            lyr.lora_B.copy_(torch.randn(lyr.lora_B.shape, generator=g) / math.sqrt(lyr.out_features))
    return layers


def to_peft(deer_model: nn.Module, case: Case) -> nn.Module:
    """`deer_model` with each deer LoRALinear replaced by peft's LoRA layer around the same frozen base
    module, with the same A, B and scale (lora_alpha = 2 r), the factor of the other phase frozen.
    deer's layers are taken out, not copied: the two models share no LoRA state and the base weights
    exist once."""
    import warnings

    import peft
    factors = {}
    for name, mod in list(deer_model.named_modules()):
        if isinstance(mod, LoRALinear):
            factors[name] = (mod.lora_A.detach().clone(), mod.lora_B.detach().clone())
            replace_module(deer_model, name, mod.base)
    cfg = peft.LoraConfig(r=case.rank, lora_alpha=2 * case.rank, lora_dropout=0.0,
                          target_modules=list(lora_targets(case)), fan_in_fan_out=case.arch == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(deer_model, cfg)
    inner = pm.base_model.model
    with torch.no_grad():
        for name, (A, B) in factors.items():
            lyr = inner.get_submodule(name)
            lyr.lora_A["default"].weight.copy_(A)
            lyr.lora_B["default"].weight.copy_(B)
            lyr.lora_A["default"].weight.requires_grad_("A" in ref.trained_factors(case.phase))
            lyr.lora_B["default"].weight.requires_grad_("B" in ref.trained_factors(case.phase))
    found = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in pm.modules())
    if found != len(factors):
        raise RuntimeError(f"peft targeted {found} layers, deer {len(factors)}: the floors would differ")
    return pm


class OpacusLoRALinear(nn.Module):
    """LoRA with the factors as nn.Linear modules, the form Opacus' grad samplers understand:
    y = base(x) + s * lora_B(lora_A(x)),  lora_A.weight = A (r, n), lora_B.weight = B (m, r)."""

    def __init__(self, src: LoRALinear):
        super().__init__()
        self.base = src.base
        m, n, r = src.out_features, src.in_features, src.r
        self.lora_A = nn.Linear(n, r, bias=False, device=src.lora_A.device, dtype=src.lora_A.dtype)
        self.lora_B = nn.Linear(r, m, bias=False, device=src.lora_B.device, dtype=src.lora_B.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(src.lora_A)
            self.lora_B.weight.copy_(src.lora_B)
        self.scale = src.scale

    def set_phase(self, phase: str):
        trained = ref.trained_factors(phase)
        self.lora_A.weight.requires_grad_("A" in trained)
        self.lora_B.weight.requires_grad_("B" in trained)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


def to_opacus_lora(deer_model: nn.Module) -> tuple[nn.Module, list[OpacusLoRALinear]]:
    """A deep copy of `deer_model` whose LoRALinear layers are OpacusLoRALinear with the same values."""
    model = copy.deepcopy(deer_model)
    swapped = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear):
            new = OpacusLoRALinear(mod)
            replace_module(model, name, new)
            swapped.append(new)
    return model, swapped


class CausalLMLoss(nn.Module):
    """deer.losses.causal_lm_loss as a criterion module with a `reduction` attribute, the form Opacus'
    ghost clipping needs (it sets reduction='none' to get the (b,) per-sample losses)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits, labels):
        return causal_lm_loss(logits, labels, reduction=self.reduction)


def criterion(case: Case) -> nn.Module:
    return nn.CrossEntropyLoss() if case.arch == "vit" else CausalLMLoss()


def logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def make_batch(case: Case, seed: int = 2) -> tuple[dict, torch.Tensor]:
    """(inputs, target): the model's keyword inputs and the loss target. ViT: random images and
    labels. Decoders: random token ids with right padding (sample i keeps T - i T / (2 b) tokens, the
    first sample unpadded, so lengths run from T down to about T / 2), attention mask, and labels =
    the ids with the padding set to -100."""
    g = torch.Generator().manual_seed(seed)
    if case.arch == "vit":
        x = torch.randn(case.batch, 3, case.img, case.img, generator=g)
        y = torch.randint(0, NUM_CLASSES, (case.batch,), generator=g)
        return {"x": x.to(case.device)}, y.to(case.device)
    vocab = DECODER_SIZES[case.arch][case.model]["vocab_size"]
    T = case.seq
    ids = torch.randint(0, vocab, (case.batch, T), generator=g)
    mask = torch.ones(case.batch, T, dtype=torch.long)
    for i in range(case.batch):
        mask[i, T - (i * T) // (2 * case.batch):] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(case.device), "attention_mask": mask.to(case.device)}, labels.to(case.device)


def build_lora_model(case: Case) -> tuple[nn.Module, list[LoRALinear]]:
    model = build_base(case)
    layers = inject_deer_lora(model, case.rank, lora_targets(case))
    model.to(case.device)
    for lyr in layers:
        lyr.set_phase(case.phase)
    return model, layers


def trainable(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------
# deer's DP step: deer.privacy.PrivacyEngine as a user writes it.
# ------------------------------------------------------------------------------------------------

def _loader(inputs: dict, target, batch: int):
    """A loader over the fixed batch (make_private and Opacus take the sample rate from it)."""
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*inputs.values(), target), batch_size=batch)


def build_deer_step(case: Case, model, layers, inputs, target, lr: float = 1e-3):
    """The deer step for `case` as a callable step(zero_grad=True): PrivacyEngine().make_private(...)
    with a mean loss and fixed batches; regulated noise uses the metric regulator (deer's sound
    default). Returns (step, impl_name)."""
    import warnings

    from deer.privacy import PrivacyEngine
    backend = resolve_backend(torch.device(case.device), None if case.backend == "-" else case.backend)
    opt = torch.optim.SGD(trainable(model), lr=lr)
    loader = _loader(inputs, target, case.batch)
    crit = criterion(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # poisson_sampling=False: fixed batches, timed only
        model_p, opt_p, _ = PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=case.sigma,
            max_grad_norm=case.max_grad_norm, mechanism="regulated_metric" if case.noise == "regulated" else "isotropic",
            lam=case.lam, poisson_sampling=False, phase=case.phase, backend=backend, seed=3, fused_update=case.fused)

    def step(zero_grad: bool = True):
        with stage("forward"):
            loss = crit(logits_of(model_p(**inputs)), target)
        with stage("backward"):
            loss.backward()
        with stage("step"):
            opt_p.step()
        if zero_grad:
            opt_p.zero_grad(set_to_none=True)
        return loss
    return step, "PrivacyEngine"


# ------------------------------------------------------------------------------------------------
# Opacus
# ------------------------------------------------------------------------------------------------

def _opacus_dp_optimizer_class():
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class PaperRegulatedDPOptimizer(DPOptimizer):
        """Opacus' flat clipping, then the paper's regulated noise as the authors' code adds it: per
        layer and step a full (m x n) Gaussian N mapped through the frozen factor's pseudo-inverse,
        A trained: xi = pinv(B) N;  B trained: xi = N pinv(A)."""

        def __init__(self, optimizer, *, frozen_of, **kw):
            super().__init__(optimizer, **kw)
            self.frozen_of = frozen_of          # id(trained param) -> ('A' | 'B', frozen factor tensor)

        def add_noise(self):
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                factor, frozen = self.frozen_of[id(p)]
                if factor == "A":                               # frozen B: (m, r); p: (r, n)
                    N = torch.randn(frozen.shape[0], p.shape[1], generator=self.generator,
                                    device=p.device, dtype=p.dtype)
                    xi = torch.linalg.pinv(frozen) @ N
                else:                                           # frozen A: (r, n); p: (m, r)
                    N = torch.randn(p.shape[0], frozen.shape[1], generator=self.generator,
                                    device=p.device, dtype=p.dtype)
                    xi = N @ torch.linalg.pinv(frozen)
                std = self.noise_multiplier * self.max_grad_norm
                p.grad = (p.summed_grad + std * xi).view_as(p)
                _mark_as_processed(p.summed_grad)

    return PaperRegulatedDPOptimizer


def build_opacus_step(case: Case, deer_model, inputs, target, lr: float = 1e-3):
    """Opacus hooks / ghost / deer_on_opacus on an OpacusLoRALinear copy of the deer model."""
    import warnings

    from opacus import GradSampleModule, PrivacyEngine

    model, olayers = to_opacus_lora(deer_model)
    for lyr in olayers:
        lyr.set_phase(case.phase)
    opt = torch.optim.SGD(trainable(model), lr=lr)
    crit = criterion(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # secure-RNG and poisson_sampling=False warnings
        if case.method in ("opacus_hooks", "opacus_ghost"):
            loader = _loader(inputs, target, case.batch)
            mode = "hooks" if case.method == "opacus_hooks" else "ghost"
            out = PrivacyEngine().make_private(
                module=model, optimizer=opt, criterion=crit, data_loader=loader,
                noise_multiplier=case.sigma, max_grad_norm=case.max_grad_norm, poisson_sampling=False,
                grad_sample_mode=mode)
            gsm, dpopt = out[0], out[1]
            crit_p = out[2] if mode == "ghost" else crit
        elif case.method == "deer_on_opacus":
            gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
            frozen_of = {}
            for lyr in olayers:
                if case.phase == "A":
                    frozen_of[id(lyr.lora_A.weight)] = ("A", lyr.lora_B.weight.detach())
                else:
                    frozen_of[id(lyr.lora_B.weight)] = ("B", lyr.lora_A.weight.detach())
            dpopt = _opacus_dp_optimizer_class()(
                opt, frozen_of=frozen_of, noise_multiplier=case.sigma, max_grad_norm=case.max_grad_norm,
                expected_batch_size=case.batch, loss_reduction="mean")
            crit_p = crit
        else:
            raise ValueError(f"not an Opacus method: {case.method!r}")

    def step(zero_grad: bool = True):
        with stage("forward"):
            loss = crit_p(logits_of(gsm(**inputs)), target)
        with stage("backward"):
            loss.backward()
        with stage("step"):
            dpopt.step()
        if zero_grad:
            dpopt.zero_grad(set_to_none=True)
        return loss
    return step, gsm, olayers, dpopt


def build_nonprivate_step(case: Case, model, inputs, target):
    """Plain LoRA training (deer's layers, or peft's for the 'peft' floor): loss, backward, SGD."""
    opt = torch.optim.SGD(trainable(model), lr=1e-3)
    crit = criterion(case)

    def step(zero_grad: bool = True):
        with stage("forward"):
            loss = crit(logits_of(model(**inputs)), target)
        with stage("backward"):
            loss.backward()
        with stage("step"):
            opt.step()
        if zero_grad:
            opt.zero_grad(set_to_none=True)
        return loss
    return step


def build_step(case: Case):
    """(step, info) for `case`: step() runs one full training step; info names what ran and holds the
    trained parameters (to check they stay finite)."""
    if case.method not in METHODS:
        raise ValueError(f"unknown method {case.method!r}; choose one of {METHODS}")
    inputs, target = make_batch(case)
    model, layers = build_lora_model(case)
    info = {"impl": case.method}
    if case.method == "nonprivate":
        step = build_nonprivate_step(case, model, inputs, target)
        info["params"] = trainable(model)
    elif case.method == "peft":
        import peft
        model = to_peft(model, case)
        step = build_nonprivate_step(case, model, inputs, target)
        info["impl"] = f"peft {peft.__version__}"
        info["params"] = trainable(model)
    elif case.method == "deer":
        step, impl = build_deer_step(case, model, layers, inputs, target)
        info["impl"] = f"deer:{impl}"
        info["params"] = trainable(model)
    else:
        step, gsm, olayers, _ = build_opacus_step(case, model, inputs, target)
        info["impl"] = f"opacus {_opacus_version()}"
        info["params"] = trainable(gsm)
        del model, layers
    return step, info


def _opacus_version() -> str:
    import opacus
    return opacus.__version__


# ------------------------------------------------------------------------------------------------
# Fairness: with the noise off, every method's clipped, averaged gradient of the same LoRA parameters
# on the same batch must agree (tests/test_bench_smoke.py).
# ------------------------------------------------------------------------------------------------

def clipped_grads(case: Case, model, inputs, target, methods=("deer", "opacus_hooks", "opacus_ghost",
                                                    "deer_on_opacus")) -> dict[str, list[torch.Tensor]]:
    """For each method: the gradient it hands the optimizer (sum_i c_i g_i / b with the noise off) for
    the trained factor of every LoRA layer, in layer order, Euclidean flat clipping (what Opacus
    does). Every method runs its real step on its own copy of `model` with lr = 0."""
    case = replace(case, sigma=0.0, noise="isotropic")
    out = {}
    for meth in methods:
        c = replace(case, method=meth)
        if meth == "deer":
            m = copy.deepcopy(model)
            lys = lora_layers(m)
            step, _ = build_deer_step(c, m, lys, inputs, target, lr=0.0)
            step(zero_grad=False)
            out[meth] = [(l.lora_A if c.phase == "A" else l.lora_B).grad.detach().clone() for l in lys]
        else:
            step, gsm, olayers, dpopt = build_opacus_step(c, model, inputs, target, lr=0.0)
            step(zero_grad=False)
            out[meth] = [(l.lora_A if c.phase == "A" else l.lora_B).weight.grad.detach().clone()
                         for l in olayers]
    return out


def reference_clipped_grads(case: Case, model, inputs, target, phase: str, max_grad_norm: float):
    """float64 oracle: per-sample gradients from deer.reference on the captured (X, G) of every layer,
    Euclidean flat clipping, mean over the batch. Returns (grads per layer, per-sample norms)."""
    m = copy.deepcopy(model)
    lys = lora_layers(m)
    for l in lys:
        l.capture = True
    crit = criterion(case)
    crit.reduction = "sum"
    crit(logits_of(m(**inputs)), target).backward()
    batches = []
    for l in lys:
        l.capture = False
        (X, U, G), = l.pop_captured()
        batches.append(ref.LayerBatch(X.double(), G.double(), l.lora_A.detach().double(),
                                      l.lora_B.detach().double(), l.scale))
    res = ref.dp_step(batches, phase, max_grad_norm, 0.0, target.shape[0])
    return [g[phase] for g in res.grads], res.sq_norms.sqrt()
