"""deer train / demo command line: config + overrides, run directory contents, resume, errors."""
import json
import os

import pytest
import yaml

from deer.cli import main
from deer.fed.config import FedConfig, load_config


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["rounds=2", "image_size=8", "num_clients=2", "clients_per_round=2", "partition=iid", "public_fraction=0.2",
        "pretrain_epochs=1", "local_steps=2", "batch_size=16", "lora_r=2", "target_epsilon=6.0",
        "model_kwargs={img_size: 8, patch_size: 4, embed_dim: 16, depth: 1, num_heads: 2, mlp_ratio: 2.0}"]


def test_config_overrides_and_errors(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump({"rounds": 7, "methods": ["deer"], "privacy": "client"}))
    cfg = load_config(str(p), ["lr=0.05", "methods=[ffa, fedavg]", "model_kwargs.depth=3"])
    assert (cfg.rounds, cfg.lr, cfg.methods, cfg.privacy) == (7, 0.05, ["ffa", "fedavg"], "client")
    assert cfg.model_kwargs["depth"] == 3 and cfg.model_kwargs["embed_dim"] == FedConfig().model_kwargs["embed_dim"]
    with pytest.raises(ValueError, match=r"job\.yaml.*unknown key\(s\) 'roundz' \(did you mean 'rounds'\?\)"):
        load_config(str(p), ["roundz=3"])
    with pytest.raises(ValueError, match="unknown method 'fedprox'"):
        load_config(str(p), ["methods=[fedprox]"])
    with pytest.raises(ValueError, match="must look like key=value"):
        load_config(str(p), ["rounds"])
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_train_writes_run_dir_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--run-dir", str(run), "--no-progress", "methods=[deer, fedavg]", "privacy=sample", *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    assert "DEeR" in out and "FedAvg-LoRA" in out and "pretrained NON-privately" in out and "scikit-learn" in out
    assert {"config.yaml", "results.json", "accuracy.png", "backbone.safetensors", "deer", "fedavg"} <= set(os.listdir(run))
    for m in ("deer", "fedavg"):
        assert {"metrics.json", "adapter.safetensors", "releases.jsonl", "state.json"} <= set(os.listdir(run / m))
        met = json.load(open(run / m / "metrics.json"))
        assert [h["round"] for h in met["history"]] == [1, 2]
        for h in met["history"]:
            assert {"accuracy", "precision", "recall", "f1", "auc", "epsilon"} <= set(h)
            assert 0 <= h["accuracy"] <= 1 and 0 <= h["auc"] <= 1
        # calibrated to the budget: spent at most 6, and close to it
        assert 5.0 < met["epsilon"] <= 6.0
    with open(run / "accuracy.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # resuming a finished run trains nothing more and keeps the same privacy spent
    before = json.load(open(run / "deer" / "metrics.json"))["epsilon"]
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert json.load(open(run / "deer" / "metrics.json"))["epsilon"] == pytest.approx(before)
    assert "resuming after round 2" in capsys.readouterr().out


BAD = [  # (override, what the one-line error must say)
    ("batch_size=abc", r"batch_size='abc': .*valid integer"),
    ("rounds=2.5", r"rounds=2.5: .*integer"),
    ("target_epsilon=-1", r"target_epsilon=-1: .*greater than 0"),
    ("delta=-0.1", r"delta=-0.1: .*greater than 0"),
    ("delta=1.5", r"delta=1.5: .*less than 1"),
    ("max_grad_norm=0", r"max_grad_norm=0: .*greater than 0"),
    ("lr=", r"lr=None: .*valid number"),
    ("lr=.nan", r"lr=nan: .*finite"),
    ("privacy=user", r"privacy='user': allowed: 'none', 'sample' or 'client'"),
    ("methods=[deer, fedprox]", r"methods='fedprox': unknown method"),
    ("clients_per_round=3", r"clients_per_round=3 is larger than num_clients=2"),
    ("lora_qkv_slices=[q, x]", r"lora_qkv_slices='x': allowed: 'q', 'k' or 'v'"),
    ("lora_r=1000", r"lora_r=1000 .*exceeds the largest rank.*'head': 10.*set lora_r <= "),
    ("lorar=4", r"unknown key\(s\) 'lorar' \(did you mean 'lora_r'\?\)"),
]


@pytest.mark.parametrize("override,why", BAD, ids=[b[0] for b in BAD])
def test_bad_config_values_fail_in_one_line_before_any_work(tmp_path, capsys, override, why):
    import re
    run = tmp_path / "run"
    rc = main(["train", "--run-dir", str(run), "--no-progress", *TINY, override])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("deer: error: ") and "\n" not in err and "Traceback" not in err, err
    assert re.search(why, err), err
    assert not (run / "backbone.safetensors").exists()        # nothing pretrained


def test_single_values_for_list_keys(tmp_path):
    cfg = load_config(None, ["methods=deer", "lora_targets=head", "public_classes=3"])
    assert (cfg.methods, cfg.lora_targets, cfg.public_classes) == (["deer"], ["head"], [3])


def test_one_class_image_folder_is_refused(tmp_path, capsys):
    from PIL import Image
    import numpy as np
    os.makedirs(tmp_path / "data" / "polyp")
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "data" / "polyp" / f"{i}.png")
    rc = main(["train", "--run-dir", str(tmp_path / "run"), "--no-progress", "--data", str(tmp_path / "data"), *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "one class folder ('polyp')" in err and "\n" not in err, err


def test_a_run_that_trained_nothing_exits_non_zero(tmp_path, capsys):
    """Every client passes its deadline at once: every sub-round is skipped, nothing is aggregated."""
    rc = main(["train", "--run-dir", str(tmp_path / "run"), "--no-progress", "methods=[ffa]", *TINY,
               "client_timeout_s=1e-9"])
    captured = capsys.readouterr()
    assert rc == 1, captured.err
    assert "FFA-LoRA trained nothing: every sub-round was skipped" in captured.err
    assert "client 0 left out" in captured.out and "deadline" in captured.out


def test_resume_refuses_changes_it_cannot_honour(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--no-progress", "methods=[ffa]", *TINY, "rounds=1"]) == 0
    capsys.readouterr()
    for extra, why in ((["rounds=3"], r"--resume: rounds=3 \(the run has 1\); .*Only progress, methods, torch_threads"),
                       (["--data", "digits"], r"--data would change it"),
                       (["--checkpoint", "x.pth"], r"--checkpoint would change it")):
        assert main(["train", "--resume", str(run), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err.strip()
        import re
        assert re.search(why, err) and "\n" not in err, err
    assert main(["train", "--resume", str(run), "--no-progress", "torch_threads=1"]) == 0


def _readme_train_commands():
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Federated training.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith(".venv/bin/deer train")]


def test_readme_train_commands_run(tmp_path, monkeypatch, capsys):
    """The README's `deer train` lines, as written, on files this test makes (a tiny model and data set
    appended as overrides, so each takes seconds)."""
    import shlex
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file
    from deer.fed.model import build_backbone
    lines = _readme_train_commands()
    assert len(lines) == 4 and "--resume" in lines[-1]
    monkeypatch.chdir(tmp_path)
    tiny = dict(o.split("=", 1) for o in TINY)
    (tmp_path / "my.yaml").write_text(yaml.safe_dump({k: yaml.safe_load(v) for k, v in tiny.items()}))
    rng = np.random.default_rng(0)
    for c in ("polyps", "ulcer", "normal"):
        os.makedirs(tmp_path / "data" / "kvasir-v2" / c)
        for i in range(24):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "data" / "kvasir-v2" / c / f"{i}.png")
    mk = yaml.safe_load(tiny["model_kwargs"])
    save_file(build_backbone("vit_tiny_patch16_224", 3, 1, mk).state_dict(), str(tmp_path / "vit_small.safetensors"))
    runs = []
    for line in lines:
        args = shlex.split(line.replace("/data/kvasir-v2", str(tmp_path / "data" / "kvasir-v2")))[1:]
        if "--resume" in args:
            args[args.index("--resume") + 1] = runs[0]
            rc = main([*args, "--no-progress"])
        else:
            rc = main([*args, "--no-progress", *([] if "--config" in args else TINY)])
            runs.append(str(sorted((tmp_path / "runs").iterdir(), key=os.path.getmtime)[-1]))
        out = capsys.readouterr()
        assert rc == 0, (line, out.err[-2000:])
    assert "resuming after round" in out.out          # the last line resumed the first line's run


def test_a_new_run_never_reuses_a_run_directory(tmp_path, monkeypatch, capsys):
    from deer.cli import _new_run_dir
    monkeypatch.chdir(tmp_path)
    a, b = _new_run_dir(None, "train-20261203-120000"), _new_run_dir(None, "train-20261203-120000")
    assert a != b and os.path.isdir(a) and os.path.isdir(b)       # two runs started in the same second
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--no-progress", "methods=[ffa]", *TINY, "rounds=1"]) == 0
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--no-progress", "methods=[ffa]", *TINY, "rounds=1", "lr=0.2"]) == 2
    err = capsys.readouterr().err
    assert f"{run} already holds a run: continue it with --resume {run}" in err


def test_a_round_where_every_client_failed_exits_non_zero(tmp_path, capsys, monkeypatch):
    from deer.fed import engine
    real = engine.train_client

    def flaky(job, cid, rnd, *a, **kw):
        if rnd == 1:
            raise RuntimeError("site network down")
        return real(job, cid, rnd, *a, **kw)
    monkeypatch.setattr(engine, "train_client", flaky)
    rc = main(["train", "--run-dir", str(tmp_path / "run"), "--no-progress", "methods=[ffa]", *TINY])
    err = capsys.readouterr().err
    assert rc == 1 and "FFA-LoRA: every sampled client failed in round 2 B" in err, err


def test_a_diverged_run_exits_non_zero(tmp_path, capsys):
    """A learning rate so large that the adapters stay finite but the model's outputs do not."""
    rc = main(["train", "--run-dir", str(tmp_path / "run"), "--no-progress", "methods=[fedavg]", "privacy=none",
               *TINY, "lr=1e12"])
    captured = capsys.readouterr()
    assert "diverged" in captured.out + captured.err
    assert rc == 1, captured.err
