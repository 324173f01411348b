"""Configuration of a federated run: one flat dataclass, loadable from YAML and overridable with
`key=value` strings on the command line (values parsed as YAML, so `rounds=3`, `lr=0.1`,
`methods=[deer,ffa]` and `model_kwargs.depth=4` all work)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..nn.config import LoRAConfig
from ..privacy.mechanism import LAM, PRESETS, Mechanism


@dataclass(frozen=True)
class MethodSpec:
    """What a method trains each sub-round and with which privacy mechanism.

    phases: the sub-rounds of one communication round ('B', 'A' or 'AB'), each one aggregation and
    one privacy release. mechanism: the clipping metric and noise (docs/design.md section 5; a
    regulated one needs a frozen factor: in an 'AB' sub-round each factor is measured and noised
    through the *other* factor's value at the start of the sub-round, which every client shares and
    the server has already released). The run's lam replaces the preset's (FedConfig.lam)."""
    name: str
    phases: tuple[str, ...]
    mechanism: Mechanism
    label: str


METHODS = {
    # DEeR: deviation eliminator (alternate B then A) + noise regulator (metric clipping, regulated noise).
    "deer": MethodSpec("deer", ("B", "A"), PRESETS["regulated_metric"], "DEeR"),
    # Ablation without the noise regulator: same alternation, Euclidean clipping and isotropic noise.
    "deer_no_nr": MethodSpec("deer_no_nr", ("B", "A"), PRESETS["isotropic"], "DEeR w/o noise regulator"),
    # Ablation without the deviation eliminator: both factors train together and are averaged
    # separately (inexact, as FedAvg-LoRA), but clipping and noise are still regulated.
    "deer_no_de": MethodSpec("deer_no_de", ("AB",), PRESETS["regulated_metric"], "DEeR w/o deviation eliminator"),
    # FFA-LoRA: A frozen at its random init for the whole run, only B trains (exact, half the capacity).
    "ffa": MethodSpec("ffa", ("B",), PRESETS["isotropic"], "FFA-LoRA"),
    # FedAvg-LoRA: both factors train, server averages A and B separately (inexact).
    "fedavg": MethodSpec("fedavg", ("AB",), PRESETS["isotropic"], "FedAvg-LoRA"),
}
_ALIASES = {"ffa-lora": "ffa", "ffa_lora": "ffa", "fedavg-lora": "fedavg", "fedavg_lora": "fedavg",
            "deer-no-nr": "deer_no_nr", "deer-no-de": "deer_no_de"}


def method_spec(name: str) -> MethodSpec:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {sorted(METHODS)}")
    return METHODS[key]


PRIVACY = ("none", "sample", "client")
BACKENDS = (None, "cpu", "cuda", "triton", "reference")


@dataclass
class FedConfig:
    # what to run
    methods: list[str] = field(default_factory=lambda: ["deer", "ffa", "fedavg"])
    privacy: str = "sample"              # none | sample (DP-SGD in each client) | client (server-side)
    rounds: int = 5
    # data
    dataset: str = "digits"              # 'digits' (bundled), an image folder, or a MedMNIST .npz
    image_size: int = 16
    image_mode: str = "L"                # 'L' grayscale or 'RGB' (image folders)
    num_clients: int = 4
    # none/sample level: exactly this many clients, drawn without replacement once per round;
    # client level: the EXPECTED number per sub-round, each client taking part independently with
    # probability q = clients_per_round / num_clients, redrawn every sub-round (Poisson sampling, what
    # the client-level accountant assumes; docs/privacy.md section 8.1)
    clients_per_round: int = 4
    partition: str = "dirichlet"         # iid | dirichlet
    alpha: float = 0.5                   # Dirichlet concentration (smaller = more non-IID)
    public_fraction: float = 0.5         # share of the training data used for non-private pretraining
    public_classes: list[int] | None = field(default_factory=lambda: [0, 1, 2, 3, 4])
    test_fraction: float = 0.25
    # model
    model: str = "vit_tiny_patch16_224"  # any timm model name; built without downloads
    model_kwargs: dict = field(default_factory=lambda: {
        "img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0})
    checkpoint: str | None = None        # local safetensors/.pth weights; skips pretraining
    pretrain_epochs: int = 8
    pretrain_lr: float = 3e-3
    lora_r: int = 4
    lora_alpha: float = 8.0
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "head"])
    lora_qkv_slices: list[str] | None = None  # null: a fused timm qkv is one LoRA layer; [q, k, v]: one per slice
    # local training
    local_epochs: int = 1
    local_steps: int | None = None       # fixed steps per client per sub-round (overrides local_epochs)
    batch_size: int = 32
    lr: float = 0.1
    weighting: str = "examples"          # FedAvg weights when not client-level private: examples | uniform
    # privacy
    target_epsilon: float | None = 8.0   # calibrate the noise multiplier to this budget ...
    noise_multiplier: float | None = None  # ... or fix it
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    lam: float = LAM                     # ridge of the regulated metric K = frozen^T frozen + lam I
    backend: str | None = None           # sample-level DP-SGD kernels: null (auto: DEER_BACKEND or the device's),
    #                                      cpu | cuda | triton | reference (the float64 oracle, same noise)
    # engineering
    seed: int = 0
    min_clients: int = 1                 # a sub-round with fewer client updates is skipped (nothing released);
    #                                      at client level only where that is sound (docs/privacy.md 7.1)
    client_timeout_s: float | None = None
    run_dir: str | None = None
    progress: bool = True
    torch_threads: int | None = None     # intra-op threads; 1 is fastest for the tiny default model

    def validate(self) -> "FedConfig":
        for m in self.methods:   # the run's lam in each method's mechanism (checks lam, too)
            method_spec(m).mechanism.replace(lam=self.lam)
        if self.privacy not in PRIVACY:
            raise ValueError(f"privacy must be one of {PRIVACY}, got {self.privacy!r}")
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(f"clients_per_round must be in [1, num_clients={self.num_clients}], "
                             f"got {self.clients_per_round}")
        if self.rounds < 1 or self.local_epochs < 1 or self.batch_size < 1 or (self.local_steps or 1) < 1:
            raise ValueError("rounds, local_epochs, local_steps and batch_size must be >= 1")
        if self.privacy != "none" and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("a private run needs target_epsilon or noise_multiplier")
        if self.weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting must be 'examples' or 'uniform', got {self.weighting!r}")
        if not 1 <= self.min_clients <= self.clients_per_round:
            raise ValueError(f"min_clients must be in [1, clients_per_round={self.clients_per_round}], "
                             f"got {self.min_clients}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} (None: automatic), got {self.backend!r}")
        self.lora_config()
        return self

    def lora_config(self) -> LoRAConfig:
        """The adapters every party injects (deer.nn.inject_lora), from lora_r/alpha/targets/qkv_slices."""
        return LoRAConfig(tuple(self.lora_targets), self.lora_r, self.lora_alpha, qkv_slices=self.lora_qkv_slices)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not run_dir/progress/methods list)."""
        d = self.to_dict()
        for k in ("run_dir", "progress", "methods", "torch_threads"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **kw) -> "FedConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "FedConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d).validate()


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> FedConfig:
    """YAML file (or the packaged default when path is None) + `key=value` overrides."""
    if path is None:
        from importlib.resources import files
        text = files("deer").joinpath("configs/default.yaml").read_text()
        src = "deer/configs/default.yaml"
    else:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read config {path!r}: {e}") from e
        src = path
    d = yaml.safe_load(text) or {}
    if not isinstance(d, dict):
        raise ValueError(f"{src}: a config is a YAML mapping of key: value, got {type(d).__name__}")
    for ov in overrides:
        apply_override(d, ov)
    return FedConfig.from_dict(d)


def apply_override(d: dict, ov: str) -> None:
    if "=" not in ov:
        raise ValueError(f"override {ov!r} must look like key=value (e.g. rounds=3, model_kwargs.depth=4)")
    key, val = ov.split("=", 1)
    value: Any = yaml.safe_load(val) if val != "" else None
    parts = key.strip().split(".")
    tgt = d
    for p in parts[:-1]:
        if p not in tgt:
            tgt[p] = dict(FedConfig.__dataclass_fields__[p].default_factory()) if (
                tgt is d and p in FedConfig.__dataclass_fields__
                and FedConfig.__dataclass_fields__[p].default_factory is not dataclasses.MISSING) else {}
        tgt = tgt[p]
    tgt[parts[-1]] = value
