"""deer train / demo command line: config + overrides, run directory contents, resume, errors."""
import json
import os

import pytest
import yaml

from deer.cli import main
from deer.fed.config import FedConfig, load_config
import torch


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
    with pytest.raises(ValueError, match="unknown config keys \\['roundz'\\]"):
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
