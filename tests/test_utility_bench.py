"""The utility benchmark (bench/utility.py) end to end on a tiny grid: every (privacy, alpha, epsilon,
method, seed) run writes one row, the references are there, a rerun resumes without running anything
again, and the report lists every method and both privacy levels."""
import json
import os
import sys

import pytest
import yaml

pytestmark = pytest.mark.usefixtures("one_thread")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))


def test_quick_grid_end_to_end(tmp_path):
    import utility
    grid = {"base": {"dataset": "digits", "image_size": 8, "num_clients": 3, "clients_per_round": 3,
                     "partition": "dirichlet", "public_fraction": 0.3, "public_classes": [0, 1, 2, 3, 4],
                     "rounds": 1, "local_steps": 2, "batch_size": 16, "lr": 0.1, "lora_r": 2, "lora_alpha": 4.0,
                     "pretrain_epochs": 1, "torch_threads": 1,
                     "model_kwargs": {"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2,
                                      "mlp_ratio": 2.0}},
            "methods": ["deer", "ffa"], "epsilons": [1, 6], "alphas": [0.5], "privacy": ["sample", "client"],
            "seeds": [0, 1], "quick": {"seeds": [0]}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "out"
    rows = utility.run_grid(str(path), str(out), quick=True, log=lambda *a: None)
    # 2 privacy levels x (1 ceiling + 2 epsilons x 2 methods), one seed
    assert len(rows) == 10 and len((out / "runs.jsonl").read_text().splitlines()) == 10
    for r in rows:
        if r["epsilon"] is None:
            assert r["level"] == "none" and r["epsilon_spent"] == 0.0
        else:
            assert 0 < r["epsilon_spent"] <= r["epsilon"] * (1 + 1e-6), r
        assert 0 <= r["final"]["accuracy"] <= 1 and r["sigma"] >= 0
    # resumable: a second call runs nothing and keeps the rows
    again = utility.run_grid(str(path), str(out), quick=True, log=lambda *a: pytest.fail("ran again"))
    assert [json.dumps(r, sort_keys=True, default=float) for r in again] == \
        [json.dumps(r, sort_keys=True, default=float) for r in rows]
    text = (out / "report.md").read_text()
    for needle in ("DEeR", "FFA-LoRA", "FedAvg-LoRA, no DP (ceiling)", "backbone, no fine-tuning (floor)",
                   "## privacy sample, Dirichlet alpha 0.5", "## privacy client, Dirichlet alpha 0.5"):
        assert needle in text, needle
    with open(out / "accuracy_vs_epsilon.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
