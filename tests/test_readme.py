"""The README's drop-in example is run as written, so the README stays true."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _example(tag: str = "readme-example") -> str:
    text = README.read_text()
    m = re.search(rf"<!-- {tag} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README.md lost its <!-- {tag} --> python block"
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


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_readme_peft_example_trains_lora_and_the_head(gen, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(gen.initial_seed())
    cfg = transformers.BertConfig(vocab_size=31, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, num_labels=3)
    base = transformers.BertForSequenceClassification(cfg).eval()
    ref = __import__("copy").deepcopy(base)
    x = torch.randint(0, 31, (64, 6), generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    monkeypatch.chdir(tmp_path)
    ns = {"model": base, "train_loader": DataLoader(TensorDataset(x, y), batch_size=16), "EPOCHS": 2}
    exec(compile(_example("readme-example-peft"), str(README), "exec"), ns)
    model = ns["model"]
    head = model.base_model.model.classifier
    assert isinstance(head, __import__("deer").nn.FullLinear)
    assert not torch.equal(head.weight, ref.classifier.weight) and not torch.equal(head.bias, ref.classifier.bias)
    loaded = peft.PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x[:4]).logits, model(input_ids=x[:4]).logits,
                                   rtol=1e-5, atol=1e-5)
