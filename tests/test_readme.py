"""The README's drop-in example is run as written, so the README stays true."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- readme-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its <!-- readme-example --> python block"
    return m.group(1)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_readme_example_runs_and_spends_the_budget(gen, capsys):
    timm = pytest.importorskip("timm")
    torch.manual_seed(gen.initial_seed())
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=8,
                              embed_dim=32, depth=1, num_heads=2)
    x = torch.randn(96, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (96,), generator=gen)
    ns = {"model": model, "train_loader": DataLoader(TensorDataset(x, y), batch_size=16), "EPOCHS": 2}
    code = _example()
    # run the README up to the optimizer line first, to see the model right after LoRA injection
    cut = code.index("optimizer =")
    exec(compile(code[:cut], str(README), "exec"), ns)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = [n for n in before if ".lora_" in n]
    assert lora, "inject_lora put no LoRA factor in the model"
    exec(compile("\n" * code[:cut].count("\n") + code[cut:], str(README), "exec"), ns)
    engine, trained = ns["engine"], ns["model"]
    eps = engine.get_epsilon(1e-5)
    assert 0.0 < eps <= 8.0 + 1e-6, eps                          # calibrated to the target, never above
    assert f"epsilon spent: {eps:.2f}" in capsys.readouterr().out
    after = {n: p.detach() for n, p in trained.named_parameters()}
    for n, p in before.items():
        if n in lora:                                            # epoch 0 trained B, epoch 1 trained A
            assert not torch.equal(after[n], p), f"{n} was never trained"
        else:                                                    # the pretrained weights stay frozen
            assert torch.equal(after[n], p), f"frozen weight {n} changed"
