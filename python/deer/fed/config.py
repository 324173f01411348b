"""Configuration of a federated run: one flat dataclass, loadable from YAML and overridable with
`key=value` strings on the command line (values parsed as YAML, so `rounds=3`, `lr=0.1`,
`methods=[deer,ffa]` and `model_kwargs.depth=4` all work)."""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ..nn.config import LoRAConfig
from ..privacy.mechanism import LAM, PRESETS, Mechanism


@dataclass(frozen=True)
class MethodSpec:
    """What a method trains each sub-round and with which privacy mechanism.

    phases: the sub-rounds of one communication round ('B', 'A' or 'AB'), each one aggregation and
    one privacy release. mechanism: the clipping metric and noise (docs/design.md section 5; a
    regulated one needs a frozen factor: in an 'AB' sub-round each factor is measured and noised
    through the *other* factor's value at the start of the sub-round, which every client shares and
    the server has already released). The run's lam replaces the preset's (FedConfig.lam).
    shared: the factors a client sends and the server aggregates, when not every trained one (None):
    FedSA-LoRA trains A and B but shares only A; each client keeps its own B across rounds."""
    name: str
    phases: tuple[str, ...]
    mechanism: Mechanism
    label: str
    shared: str | None = None

    def require_stateless_clients(self, where: str) -> None:
        """Raise ConfigError where clients keep no state between rounds (Flower) but this method needs it."""
        if self.shared is not None:
            raise ConfigError(f"{where}: method {self.name!r} ({self.label}) keeps every client's own "
                              f"{'/'.join(sorted(set('AB') - set(self.shared)))} between rounds, and deer's Flower "
                              f"ClientApp keeps no state between rounds: it runs in-process only "
                              f"(deer train methods=[{self.name}]); use another method on Flower")

    def sent(self, phase: str) -> str:
        """The factors of `phase` that leave the client, as a phase string ('A', 'B' or 'AB')."""
        return phase if self.shared is None else "".join(f for f in phase if f in self.shared)


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
    # FedSA-LoRA: both factors train, only A is sent and averaged; every client keeps its own B (a
    # personalised model: global A, the client's B), which never leaves it.
    "fedsa": MethodSpec("fedsa", ("AB",), PRESETS["isotropic"], "FedSA-LoRA", shared="A"),
}
_ALIASES = {"ffa-lora": "ffa", "ffa_lora": "ffa", "fedavg-lora": "fedavg", "fedavg_lora": "fedavg",
            "fedsa-lora": "fedsa", "fedsa_lora": "fedsa",
            "deer-no-nr": "deer_no_nr", "deer-no-de": "deer_no_de"}


def method_spec(name: str) -> MethodSpec:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {sorted(METHODS)}")
    return METHODS[key]


PRIVACY = ("none", "sample", "client")
# Keys that do not change a method's results: a resumed run may change these and no other.
RESULT_NEUTRAL = ("run_dir", "progress", "methods", "torch_threads")
BACKENDS = (None, "cpu", "cuda", "triton", "reference")


def _listed(v):
    """A list-typed key given one value (`methods=deer`, `lora_targets: qkv`) is a list of one."""
    return [v] if isinstance(v, (str, int, float)) and not isinstance(v, bool) else v


def _method(name: str) -> str:
    method_spec(name)
    return name


_Pos = Annotated[int, Field(ge=1)]
_PosFloat = Annotated[float, Field(gt=0)]
_Fraction = Annotated[float, Field(ge=0, lt=1)]
_Names = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1), BeforeValidator(_listed)]


@pydantic_dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True))
class FedConfig:
    """Every key is type- and range-checked when the config is built (from YAML, key=value overrides or
    Python), before any data is loaded: an error names the key, the value and what is allowed."""
    # what to run
    methods: Annotated[list[Annotated[str, AfterValidator(_method)]], Field(min_length=1),
                       BeforeValidator(_listed)] = field(default_factory=lambda: ["deer", "ffa", "fedavg"])
    privacy: Literal["none", "sample", "client"] = "sample"  # sample: DP-SGD in each client; client: server-side
    rounds: _Pos = 5
    # data
    dataset: Annotated[str, Field(min_length=1)] = "digits"  # 'digits' (bundled), an image folder, or a MedMNIST .npz
    image_size: Annotated[int, Field(ge=1, le=4096)] = 16
    image_mode: Literal["L", "RGB"] = "L"  # grayscale or RGB (image folders)
    num_clients: _Pos = 4
    # none/sample level: exactly this many clients, drawn without replacement once per round;
    # client level: the EXPECTED number per sub-round, each client taking part independently with
    # probability q = clients_per_round / num_clients, redrawn every sub-round (Poisson sampling, what
    # the client-level accountant assumes; docs/privacy.md section 8.1)
    clients_per_round: _Pos = 4
    partition: Literal["iid", "dirichlet"] = "dirichlet"
    alpha: _PosFloat = 0.5               # Dirichlet concentration (smaller = more non-IID)
    public_fraction: _Fraction = 0.5     # share of the training data used for non-private pretraining
    public_classes: Annotated[list[Annotated[int, Field(ge=0)]] | None, BeforeValidator(_listed)] = \
        field(default_factory=lambda: [0, 1, 2, 3, 4])
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25
    # held out of the training data (all classes) as a public validation split: each round is scored
    # on it too, and the result's "best" is the test score at the round with the best validation accuracy
    val_fraction: _Fraction = 0.0
    # model
    model: Annotated[str, Field(min_length=1)] = "vit_tiny_patch16_224"  # any timm model name; built without downloads
    model_kwargs: dict[str, Any] = field(default_factory=lambda: {
        "img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0})
    checkpoint: str | None = None        # local safetensors/.pth weights; skips pretraining
    pretrain_epochs: Annotated[int, Field(ge=0)] = 8
    pretrain_lr: _PosFloat = 3e-3
    lora_r: _Pos = 4
    lora_alpha: _PosFloat = 8.0
    lora_targets: _Names = field(default_factory=lambda: ["qkv", "head"])
    # {layer name, dotted suffix or regex: rank} for targets whose rank differs from lora_r
    lora_rank_pattern: dict[str, _Pos] = field(default_factory=dict)
    # null: a fused timm qkv is one LoRA layer; [q, k, v] (or a subset): one per slice
    lora_qkv_slices: Annotated[list[Literal["q", "k", "v"]] | None, BeforeValidator(_listed)] = None
    # layers trained fully beside the LoRA factors (peft's modules_to_save, e.g. [head]); they train in
    # every sub-round that trains B (DEeR: the B sub-round) and are aggregated as they are
    modules_to_save: Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_listed)] = \
        field(default_factory=list)
    # local training
    local_epochs: _Pos = 1
    local_steps: _Pos | None = None      # fixed steps per client per sub-round (overrides local_epochs)
    batch_size: _Pos = 32
    lr: _PosFloat = 0.1
    # local SGD's momentum and weight decay (torch.optim.SGD's), re-created at every sub-round: no
    # optimizer state survives a client's sub-round; both act on the already private gradients
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    weighting: Literal["examples", "uniform"] = "examples"  # FedAvg weights when not client-level private
    # privacy
    target_epsilon: _PosFloat | None = 8.0   # calibrate the noise multiplier to this budget ...
    noise_multiplier: Annotated[float, Field(ge=0)] | None = None  # ... or fix it (0: no noise, epsilon inf)
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    max_grad_norm: _PosFloat = 1.0
    lam: _PosFloat = LAM                 # ridge of the regulated metric K = frozen^T frozen + lam I
    # sample-level DP-SGD kernels: null (auto: DEER_BACKEND or the device's), cpu | cuda | triton |
    # reference (the float64 oracle, same noise)
    backend: Literal["cpu", "cuda", "triton", "reference"] | None = None
    # engineering
    seed: Annotated[int, Field(ge=0)] = 0
    min_clients: _Pos = 1                # a sub-round with fewer client updates is skipped (nothing released);
    #                                      at client level only where that is sound (docs/privacy.md 7.1)
    client_timeout_s: _PosFloat | None = None
    # none/sample level: each site's update (its factors minus the global ones) scaled down to this
    # Euclidean norm if larger; post-processing, no privacy cost; bounds one site's pull on the mean
    update_norm_bound: _PosFloat | None = None
    run_dir: str | None = None
    progress: bool = True
    torch_threads: _Pos | None = None    # intra-op threads; 1 is fastest for the tiny default model

    def __post_init__(self):
        self.validate()

    def validate(self) -> "FedConfig":
        """The rules between keys (each key's own type and range are checked on construction)."""
        for m in self.methods:   # the run's lam in each method's mechanism
            method_spec(m).mechanism.replace(lam=self.lam)
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round={self.clients_per_round} is larger than num_clients="
                             f"{self.num_clients}: allowed 1..{self.num_clients}")
        if self.privacy != "none" and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(f"privacy={self.privacy!r} needs target_epsilon or noise_multiplier (both are null)")
        if self.min_clients > self.clients_per_round:
            raise ValueError(f"min_clients={self.min_clients} is larger than clients_per_round="
                             f"{self.clients_per_round}: allowed 1..{self.clients_per_round}")
        if self.update_norm_bound is not None and self.privacy == "client":
            raise ValueError(f"update_norm_bound={self.update_norm_bound} applies at privacy 'none' or 'sample'; at "
                             "client level the server already clips every update to max_grad_norm")
        self.lora_config()
        return self

    def lora_config(self) -> LoRAConfig:
        """The adapters every party injects (deer.nn.inject_lora), from lora_r/alpha/targets/qkv_slices."""
        return LoRAConfig(tuple(self.lora_targets), self.lora_r, self.lora_alpha, self.lora_rank_pattern,
                          qkv_slices=self.lora_qkv_slices, modules_to_save=tuple(self.modules_to_save))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes results (every key but RESULT_NEUTRAL)."""
        d = self.to_dict()
        for k in RESULT_NEUTRAL:
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **kw) -> "FedConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "FedConfig":
        """Build and check a config; any problem is one ConfigError line naming `source`, the key, the
        value and what is allowed."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            raise ConfigError(f"{source}: unknown key(s) " + ", ".join(
                f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
                + f"; valid keys: {', '.join(sorted(names))}")
        try:
            return cls(**d)
        except ValidationError as e:
            raise ConfigError(f"{source}: {_one_line(e)}") from None
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{source}: {e}") from None


class ConfigError(ValueError):
    """A config key with a wrong type or value, or keys that contradict each other (one line)."""


def _one_line(e: ValidationError) -> str:
    out = []
    for err in e.errors(include_url=False):
        loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
        key = ".".join(loc[:1]) if loc else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":
            msg = msg.replace("Input should be", "allowed:")
        out.append(f"{key}={err['input']!r}: {msg}" if key else msg)
    return "; ".join(dict.fromkeys(out))


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
    return FedConfig.from_dict(d, src + (f" with overrides {list(overrides)}" if overrides else ""))


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
