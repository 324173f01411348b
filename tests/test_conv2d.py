"""LoRA on nn.Conv2d (timm ResNet, ConvNeXt stems), as peft's conv LoRA: computed as a Linear branch on
the unfolded input, so per-sample capture and kernels are those of every LoRA layer. The output is
unchanged with B = 0 and every branch moves it, merge folds the delta, per-sample gradients through
make_private equal per-sample autograd on a copy that never saw the privacy engine, the adapter
reloads in peft with identical outputs, and convolutions deer cannot adapt are refused."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deer import save_adapter
from deer.nn import inject_lora, lora_units
from deer.nn.lora import LoRAConv2d

from test_lora_probe import dead_units
from test_reused_layers import C, _assert_close, _oracle_grads, _prepare, _private_grads

timm = pytest.importorskip("timm")


def _resnet(seed=0):
    torch.manual_seed(seed)
    # zero_init_last=False: timm zeroes each block's last BatchNorm, which would zero the blocks' gradients
    return timm.create_model("resnet18", pretrained=False, num_classes=3, in_chans=3, zero_init_last=False).eval()


# "(conv1)": a regex, so it matches the stem alone (a plain "conv1" also matches every block's conv1)
TARGETS = [r"layer1\.0\.conv1", r"layer2\.0\.conv2", r"layer2\.0\.downsample\.0", "(conv1)", "fc"]


def test_conv2d_is_wrapped_with_the_same_output_and_live_branches(gen):
    model = _resnet()
    x = torch.randn(2, 3, 19, 23, generator=gen)          # odd sizes: padding and stride at the edges
    with torch.no_grad():
        want = model(x)
    inject_lora(model, TARGETS, r=3)
    convs = [n for n, u in lora_units(model) if isinstance(u, LoRAConv2d)]
    assert sorted(convs) == ["conv1", "layer1.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    assert dead_units(model, x, gen) == []
    with torch.no_grad():
        for _, u in lora_units(model):
            u.lora_B.copy_(0.1 * torch.randn(u.lora_B.shape, generator=gen))
        live = model(x)
        for _, u in lora_units(model):
            u.merge()
        torch.testing.assert_close(model(x), live, rtol=1e-4, atol=1e-4)


def test_branch_is_peft_conv_lora(gen):
    """s * B(A(x)) with A a convolution like the base (r out channels) and B a 1x1 convolution."""
    base = nn.Conv2d(5, 7, kernel_size=3, stride=2, padding=1, dilation=1, bias=True)
    u = LoRAConv2d(base, r=2, alpha=3.0)
    with torch.no_grad():
        u.lora_B.copy_(torch.randn(u.lora_B.shape, generator=gen))
    x = torch.randn(3, 5, 9, 11, generator=gen)
    want = base(x) + 1.5 * F.conv2d(F.conv2d(x, u.lora_A.view(2, 5, 3, 3), stride=2, padding=1),
                                    u.lora_B.view(7, 2, 1, 1))
    torch.testing.assert_close(u(x), want, rtol=1e-5, atol=1e-5)
    for bad in (nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding="same"),
                nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")):
        with pytest.raises(ValueError, match="groups=1, zero padding"):
            LoRAConv2d(bad, r=2)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.tanh(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize("build", ["cnn", "resnet"])
def test_per_sample_gradients_match_autograd(gen, build):
    b = 5
    if build == "cnn":
        net, targets, x = SmallCNN(), ["c1", "c2", "fc"], torch.randn(b, 3, 9, 7, generator=gen)
    else:
        net, targets, x = _resnet(int(gen.initial_seed() % 1000)), TARGETS, torch.randn(b, 3, 16, 16, generator=gen)
        net.train()
        for m in net.modules():          # BatchNorm in training mode couples samples; eval statistics do not
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    y = torch.randint(0, 3, (b,), generator=gen)
    model, oracle = _prepare(net, gen, targets)
    got = _private_grads(model, lambda m: F.cross_entropy(m(x), y, reduction="sum").backward(), b)
    want = _oracle_grads(oracle, lambda m, i: F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]), b)
    _assert_close(got, want)


def test_conv_adapter_reloads_in_peft(tmp_path, gen):
    peft = pytest.importorskip("peft")
    base = SmallCNN().eval()
    model = inject_lora(copy.deepcopy(base), ["c1", "c2", "fc"], r=2, alpha=4)
    with torch.no_grad():
        for _, u in lora_units(model):
            u.lora_B.copy_(torch.randn(u.lora_B.shape, generator=gen))
    save_adapter(model, tmp_path / "adapter")
    x = torch.randn(2, 3, 9, 7, generator=gen)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_batchnorm_in_training_mode_is_refused(gen):
    """BatchNorm's batch statistics couple the samples: make_private refuses the step, naming the layers;
    with BatchNorm in eval mode the same model trains."""
    import warnings
    import deer
    model = inject_lora(_resnet(), ["(conv1)", "fc"], r=2).train()
    params = [p for _, u in lora_units(model) for p in (u.lora_A, u.lora_B)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = deer.make_private(model, torch.optim.SGD(params, lr=0.1), None, noise_multiplier=1.0,
                                          max_grad_norm=1.0, sample_rate=0.1, expected_batch_size=4.0, seed=0)
    x, y = torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"BatchNorm layer\(s\) \['bn1', 'layer1.0.bn1'.*training mode.*nothing was charged"):
        opt.step()
    assert opt.steps_taken == 0 and opt.engine.get_epsilon(1e-5) == 0.0      # nothing charged
    opt.zero_grad()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.steps_taken == 1


def test_peft_conv_lora_converts_and_trains(gen):
    """peft's Conv2d LoRA in: make_private converts it (A, B as 2-D views of peft's tensors, swapped into
    the optimizer); with noise off the step equals the clipped per-sample autograd mean through peft's
    own layers, and the update lands in peft's tensors too."""
    import warnings
    import deer
    peft = pytest.importorskip("peft")
    torch.manual_seed(int(gen.initial_seed() % 1000))
    pm = peft.get_peft_model(SmallCNN(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c1", "c2", "fc"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    b = 5
    x, y = torch.randn(b, 3, 9, 7, generator=gen), torch.randint(0, 4, (b,), generator=gen)
    oracle = copy.deepcopy(pm)
    names = [n for n, p in oracle.named_parameters() if p.requires_grad]
    params = dict(oracle.named_parameters())
    want = dict(zip(names, _oracle_grads(oracle, lambda m, i: F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]), b,
                                         [params[n] for n in names])))
    peft_a = pm.base_model.model.c1.lora_A["default"].weight
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = deer.make_private(pm, opt, None, noise_multiplier=0.0, max_grad_norm=C, sample_rate=0.5,
                                          expected_batch_size=float(b), seed=0, loss_reduction="sum", phase="AB")
    c1 = model.base_model.model.c1
    assert isinstance(c1, LoRAConv2d) and c1.lora_A.data_ptr() == peft_a.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle(x), rtol=1e-5, atol=1e-5)
    start = peft_a.detach().clone()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()
    assert opt.last_step["clipped_fraction"] > 0.5
    for n, u in lora_units(model):
        for f in "AB":
            key = f"{n}.lora_{f}.default.weight"
            g = u.factor(f).grad.view_as(want[key])
            assert float((g - want[key]).norm() / want[key].norm()) < 1e-4, key
    # the step updated the shared storage: peft's own tensor moved by -lr * grad
    torch.testing.assert_close(peft_a.detach(), start - c1.lora_A.grad.view_as(start), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="dilation"):
        from deer.nn import from_peft
        net = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2), nn.Flatten())
        from_peft(peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0"])))
