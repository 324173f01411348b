"""Acceptance 2: DEeR on a real Flower deployment (one flower-superlink, two flower-supernode processes
on 127.0.0.1) gives the same global adapters as the in-process engine with the same seeds."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("flwr")

from safetensors.torch import load_file  # noqa: E402

from deer.fed import FedConfig, run_method  # noqa: E402
from deer.fed.flower_app import write_job  # noqa: E402
from deer.nn import lora_key  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


BIN = os.path.dirname(sys.executable)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name):
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} not installed")
    return path


def _start(cmd, log_path, env):
    f = open(log_path, "w")
    # own session: the process and the app processes it spawns form one group we can stop by its id
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True), f


def _stop(procs):
    """Stop every process we started and every process they spawned (SuperExec, ServerApp, ClientApp;
    some start in their own session), each by its pid: SIGTERM, then SIGKILL after 10 s."""
    import psutil
    victims = []
    for p, _ in procs:
        try:
            victims += [psutil.Process(p.pid)] + psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for v in victims:
        try:
            v.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(victims, timeout=10)
    for v in alive:
        try:
            v.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    for p, f in procs:
        p.wait(timeout=10)
        f.close()
    return victims


def test_flower_deer_matches_in_process(tmp_path, gen):
    seed = gen.initial_seed() % 100000
    cfg = FedConfig(rounds=2, dataset="digits", image_size=8, num_clients=2, clients_per_round=2, partition="iid",
                    public_fraction=0.2, public_classes=None, pretrain_epochs=1, local_steps=2, batch_size=16,
                    lr=0.1, lora_r=2, lora_alpha=4.0, seed=seed, progress=False, privacy="sample",
                    noise_multiplier=0.8, methods=["deer"], torch_threads=1,
                    model_kwargs={"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2,
                                  "mlp_ratio": 2.0}).validate()
    job_dir, out_dir, app_dir, home = (tmp_path / d for d in ("job", "out", "app", "flwr_home"))
    job = write_job(cfg, str(job_dir), log=lambda *a: None)
    expected = run_method(job, "deer", log=lambda *a: None)["adapters"]

    link_port = _free_port()
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(f"""
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "deerflower"
version = "1.0.0"
description = "deer DEeR test app"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "deer"

[tool.flwr.app.components]
serverapp = "deer.fed.flower_app:server_app"
clientapp = "deer.fed.flower_app:client_app"

[tool.flwr.app.config]
job-dir = "{job_dir}"
out-dir = "{out_dir}"
method = "deer"
connect-timeout = 60
""")
    home.mkdir()
    (home / "config.toml").write_text(f"""
[superlink]
default = "local"

[superlink.local]
address = "127.0.0.1:{link_port}"
insecure = true
""")
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PYTHONPATH=os.pathsep.join(sys.path), PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    procs = []
    try:
        procs.append(_start([_tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
                             "--disable-runtime-dependency-installation"], tmp_path / "superlink.log", env))
        for k in range(2):
            procs.append(_start([_tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                                 "--host", "127.0.0.1", "--port", str(_free_port()),
                                 "--node-config", f"partition-id={k} num-partitions=2"],
                                tmp_path / f"supernode{k}.log", env))
        deadline = time.monotonic() + 60
        while True:  # the SuperLink takes a few seconds to start answering
            sub = subprocess.run([_tool("flwr"), "run", str(app_dir), "local"], env=env, capture_output=True,
                                 text=True, timeout=60, cwd=tmp_path)
            if sub.returncode == 0 or "unavailable" not in sub.stdout + sub.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert sub.returncode == 0, sub.stdout + sub.stderr + (tmp_path / "superlink.log").read_text()[-3000:]
        deadline = time.monotonic() + 400  # each message starts a flwr-clientapp process (torch import)
        result = out_dir / "metrics.json"
        while not result.exists():
            dead = [p.args[0] for p, _ in procs if p.poll() is not None]
            logs = "\n".join(f.read_text()[-3000:] for f in tmp_path.glob("*.log"))
            assert not dead, f"{dead} exited early:\n{logs}"
            assert time.monotonic() < deadline, f"Flower run did not finish in time:\n{logs}"
            time.sleep(1)
        time.sleep(0.5)
        got = load_file(str(out_dir / "adapter.safetensors"))     # deer.nn.get_lora_state names
    finally:
        stopped = _stop(procs)
    assert all(p.poll() is not None for p, _ in procs)
    assert not [v.pid for v in stopped if v.is_running() and v.status() != "zombie"]
    assert set(got) == set(expected) == set(job.init_adapters)
    for k, t in expected.items():
        torch.testing.assert_close(got[k], t, rtol=1e-5, atol=1e-6, msg=f"{k} (seed {seed})")
        # and training moved both factors (DEeR's B and A sub-rounds) away from their initial values
        assert not torch.equal(t, job.init_adapters[k]), k


class _Relay:
    """What FlowerClients and the ClientApp (_client_train) do, without processes: the global adapters
    and the replies travel as Flower ArrayRecords, the releases as JSON, and only the trained factors
    come back. `up`: how many SuperNodes report as connected."""

    def __init__(self, job, up):
        self.job, self.up, self.asked = job, up, 0

    def available(self):
        return self.up

    def train(self, cids, rnd, si, phase, spec, sigma, start):
        from deer.fed.client import ClientUpdate
        from deer.fed.engine import train_client
        from deer.fed.flower_app import _from_record, _to_record
        from deer.nn import set_lora_state
        out = {}
        for cid in cids:
            self.asked += 1
            upd = train_client(self.job, cid, rnd, si, phase, spec, sigma, _from_record(_to_record(start)))
            set_lora_state(self.job.model, start)
            factors = {k: t for k, t in upd.adapters.items() if lora_key(k)[1] in phase}
            out[cid] = ClientUpdate(_from_record(_to_record(factors)), upd.num_examples, upd.steps, upd.loss,
                                    [tuple(r) for r in json.loads(json.dumps(upd.releases))])
        return out


def test_flower_transport_matches_in_process_client_level_poisson(gen, tmp_path):
    """The ServerApp runs the engine's own round loop with Flower as the transport: Poisson client
    sampling redrawn every sub-round, clipped sum + noise over q N, one release per sub-round, and the
    min_clients rule only before the draw (on the SuperNodes connected). Driven in-process through
    Flower's records here (the real deployment is the test above): the same adapters and the same
    privacy journal as the in-process clients."""
    from deer.fed import prepare_job
    from deer.fed.accounting import ReleaseJournal
    seed = gen.initial_seed() % 100000
    cfg = FedConfig(rounds=2, dataset="digits", image_size=8, num_clients=4, clients_per_round=2, partition="iid",
                    public_fraction=0.2, public_classes=None, pretrain_epochs=1, local_steps=2, batch_size=16,
                    lr=0.1, lora_r=2, lora_alpha=4.0, seed=seed, progress=False, privacy="client",
                    noise_multiplier=1.1, min_clients=2, methods=["deer"],
                    model_kwargs={"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2,
                                  "mlp_ratio": 2.0}).validate()
    job = prepare_job(cfg, log=lambda *a: None)
    expected = run_method(job, "deer", log=lambda *a: None)
    relay = _Relay(job, up=cfg.num_clients)
    got = run_method(job, "deer", str(tmp_path / "flower"), log=lambda *a: None, clients=relay)
    assert relay.asked > 0
    assert set(got["adapters"]) == set(expected["adapters"]) == set(job.init_adapters)
    for k, t in expected["adapters"].items():
        assert torch.equal(got["adapters"][k], t), (k, seed)
    journal = ReleaseJournal(str(tmp_path / "flower" / "releases.jsonl"))
    assert journal.releases("server") == [(1.1, 0.5, 1)] * 4 and got["skipped"] == expected["skipped"] == []
    assert got["epsilon"] == pytest.approx(expected["epsilon"], rel=1e-12)
    assert [r["accuracy"] for r in got["history"]] == [r["accuracy"] for r in expected["history"]]
    # fewer SuperNodes connected than min_clients: every sub-round skipped before anyone is asked
    down = _Relay(job, up=1)
    res = run_method(job, "deer", str(tmp_path / "down"), log=lambda *a: None, clients=down)
    assert down.asked == 0 and res["releases"] == 0 and res["epsilon"] == 0.0
    assert res["skipped"] == [{"round": r, "phase": p, "valid": 0} for r in range(2) for p in ("B", "A")]
    assert all(torch.equal(res["adapters"][k], t) for k, t in job.init_adapters.items())
