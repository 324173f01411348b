"""One LoRA stack: the federated trainer builds its model with deer.nn.inject_lora, so a model built
by hand (the drop-in path) from the same backbone, the same LoRAConfig and the same seed has the same
LoRA units, the same parameters and the same forward output."""
import pytest
import torch
from safetensors.torch import load_file

from deer.fed import prepare_job
from deer.fed.engine import stream_seed
from deer.fed.model import build_backbone
from deer.nn import LoRAConfig, LoRALinear, LoRAQKV, get_lora_state, inject_lora, lora_units, set_lora_state

from test_fed_engine import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("slices", [None, ["q", "v"]])
def test_federated_and_drop_in_models_are_the_same_model(tmp_path, gen, slices):
    cfg = tiny_cfg(gen.initial_seed() % 10000, lora_qkv_slices=slices)
    backbone = str(tmp_path / "backbone.safetensors")
    job = prepare_job(cfg, log=lambda *a: None, backbone_path=backbone)
    assert isinstance(job.lora, LoRAConfig)

    # the drop-in path: the same backbone, deer.nn.inject_lora with the job's LoRAConfig and seed
    model = build_backbone(cfg.model, job.data.num_classes, job.data.test.in_chans, cfg.model_kwargs)
    model.load_state_dict(load_file(backbone))
    inject_lora(model, LoRAConfig(tuple(cfg.lora_targets), cfg.lora_r, cfg.lora_alpha, qkv_slices=slices),
                seed=stream_seed(cfg.seed, "init"))

    fed_units, own_units = lora_units(job.model), lora_units(model)
    assert [n for n, _ in fed_units] == [n for n, _ in own_units]
    qkv = [type(m) for n, m in job.model.named_modules() if n.endswith("attn.qkv")]
    assert qkv == [LoRALinear if slices is None else LoRAQKV] * cfg.model_kwargs["depth"]
    ours = get_lora_state(model)
    assert list(ours) == list(job.init_adapters)
    for k, t in job.init_adapters.items():
        assert torch.equal(ours[k], t), k
    assert any(k.endswith(".lora_A") and t.abs().sum() > 0 for k, t in ours.items())
    # a trained state (B != 0) moved from one to the other gives the same outputs
    trained = {k: t + 0.2 * torch.randn(t.shape, generator=gen) for k, t in ours.items()}
    set_lora_state(model, trained, strict=True)
    set_lora_state(job.model, trained, strict=True)
    x = job.data.test.x[:7]
    with torch.no_grad():
        out = model.eval()(x)
        assert torch.equal(job.model.eval()(x), out)
        set_lora_state(model, {k: torch.zeros_like(t) if k.endswith(".lora_B") else t for k, t in trained.items()})
        assert (model(x) - out).abs().max() > 1e-4   # the LoRA branch is live on both
