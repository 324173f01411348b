"""DEeR on a real Flower deployment (one flower-superlink, flower-supernode processes on 127.0.0.1):
the same global adapters as the in-process engine with the same seeds, a killed SuperNode left out
and taken back when restarted, a restarted SuperLink resumed from the last completed round."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("flwr")

from safetensors.torch import load_file  # noqa: E402

from deer.fed import FedConfig, run_method  # noqa: E402
from deer.fed.flower_app import APP_PYPROJECT, CONNECT_TIMEOUT_S, write_job  # noqa: E402
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


def _kill_tree(proc):
    """SIGKILL a process and everything it spawned, by PID (what a crash or an operator's kill -9 does)."""
    import psutil
    try:
        root = psutil.Process(proc.pid)
        victims = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for v in victims:
        try:
            v.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)


class Deployment:
    """A real Flower deployment on 127.0.0.1: one flower-superlink, SuperNodes by partition-id, `flwr
    run` of deer's apps on a job directory. Every process is stopped (with its children) at the end."""

    def __init__(self, tmp_path, job_dir, out_dir, method, num_partitions, clientapp=None):
        self.tmp, self.port, self.n = tmp_path, _free_port(), num_partitions
        self.procs, self.nodes, self.starts, self.log_of = [], {}, 0, {}
        self.app, home = tmp_path / "app", tmp_path / "flwr_home"
        self.app.mkdir()
        app = APP_PYPROJECT.format(job_dir=job_dir, out_dir=out_dir, method=method,
                                   connect_timeout=CONNECT_TIMEOUT_S)
        if clientapp:
            app = app.replace('clientapp = "deer.fed.flower_app:client_app"', f'clientapp = "{clientapp}"')
        (self.app / "pyproject.toml").write_text(app)
        home.mkdir()
        (home / "config.toml").write_text(f"""
[superlink]
default = "local"

[superlink.local]
address = "127.0.0.1:{self.port}"
insecure = true
""")
        self.env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                        PYTHONPATH=os.pathsep.join(sys.path), PATH=BIN + os.pathsep + os.environ.get("PATH", ""))

    def _start(self, cmd, name):
        self.starts += 1
        self.log_of[name] = self.tmp / f"{name}.{self.starts}.log"   # the latest process of that name
        proc = _start(cmd, self.log_of[name], self.env)
        self.procs.append(proc)
        return proc[0]

    def superlink(self, database=None):
        """database: a file for the SuperLink's state, so a restarted SuperLink still knows the
        SuperNodes (with the default in-memory state they are told to leave, and exit)."""
        self.link = self._start([_tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                 str(self.port), "--disable-runtime-dependency-installation",
                                 *(["--database", str(database)] if database else [])], "superlink")

    def supernode(self, k, node_config=""):
        self.nodes[k] = self._start([_tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                     "--host", "127.0.0.1", "--port", str(_free_port()),
                                     "--node-config", f"partition-id={k} num-partitions={self.n} {node_config}".strip()],
                                    f"supernode{k}")

    def submit(self):
        deadline = time.monotonic() + 60
        while True:  # the SuperLink takes a few seconds to start answering
            sub = subprocess.run([_tool("flwr"), "run", str(self.app), "local"], env=self.env, capture_output=True,
                                 text=True, timeout=60, cwd=self.tmp)
            if sub.returncode == 0 or "unavailable" not in sub.stdout + sub.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert sub.returncode == 0, sub.stdout + sub.stderr + self.logs()

    def logs(self):
        return "\n".join(f"== {f.name}\n" + f.read_text()[-3000:] for f in sorted(self.tmp.glob("*.log")))

    def wait_for(self, path, timeout=400, done=lambda p: p.exists(), poll=0.5):
        """Until done(path); fails if a process exited (except those killed on purpose) or time is up."""
        deadline = time.monotonic() + timeout  # each message starts a flwr-clientapp process (torch import)
        while not done(path):
            dead = [p.args[0] for p, _ in self.procs if p.poll() is not None and p not in self.killed]
            assert not dead, f"{dead} exited early:\n{self.logs()}"
            assert time.monotonic() < deadline, f"waited {timeout}s for {path.name}:\n{self.logs()}"
            time.sleep(poll)

    def wait_round(self, out_dir, rnd, timeout=400):
        """Until the run directory's checkpoint says round `rnd` (1-based) is complete."""
        def done(js):
            try:
                return json.loads(js.read_text())["round"] + 1 >= rnd
            except (OSError, ValueError, KeyError):
                return False
        self.wait_for(out_dir / "state.json", timeout, done)

    killed: list = []

    def kill(self, proc):
        self.killed = self.killed + [proc]
        _kill_tree(proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        stopped = _stop(self.procs)
        assert all(p.poll() is not None for p, _ in self.procs)
        assert not [v.pid for v in stopped if v.is_running() and v.status() != "zombie"]


def _tiny(seed, **kw):
    base = dict(rounds=2, dataset="digits", image_size=8, num_clients=2, clients_per_round=2, partition="iid",
                public_fraction=0.2, public_classes=None, pretrain_epochs=1, local_steps=2, batch_size=16,
                lr=0.1, lora_r=2, lora_alpha=4.0, seed=seed, progress=False, privacy="sample",
                noise_multiplier=0.8, methods=["deer"], torch_threads=1,
                model_kwargs={"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2,
                              "mlp_ratio": 2.0})
    return FedConfig(**{**base, **kw}).validate()


def test_flower_deer_matches_in_process(tmp_path, gen):
    seed = gen.initial_seed() % 100000
    cfg = _tiny(seed)
    job_dir, out_dir = tmp_path / "job", tmp_path / "out"
    job = write_job(cfg, str(job_dir), log=lambda *a: None)
    expected = run_method(job, "deer", log=lambda *a: None)["adapters"]
    with Deployment(tmp_path, job_dir, out_dir, "deer", 2) as d:
        d.superlink()
        for k in range(2):
            d.supernode(k)
        d.submit()
        d.wait_for(out_dir / "metrics.json")
        time.sleep(0.5)
        got = load_file(str(out_dir / "adapter.safetensors"))     # deer.nn.get_lora_state names
    assert set(got) == set(expected) == set(job.init_adapters)
    for k, t in expected.items():
        torch.testing.assert_close(got[k], t, rtol=1e-5, atol=1e-6, msg=f"{k} (seed {seed})")
        # and training moved both factors (DEeR's B and A sub-rounds) away from their initial values
        assert not torch.equal(t, job.init_adapters[k]), k


def test_flower_survives_a_killed_supernode_and_takes_it_back(tmp_path, gen):
    """One of three SuperNodes is killed (SIGKILL, by PID) as round 2 starts: the run goes on without it
    (its absence logged), and the SuperNode restarted for the same partition (a new node id) takes part
    again in a later round. Adapters and metrics are written; the journal holds every release."""
    from deer.fed.accounting import ReleaseJournal
    seed = gen.initial_seed() % 100000
    cfg = _tiny(seed, rounds=4, num_clients=3, clients_per_round=3, methods=["ffa"], client_timeout_s=40.0)
    job_dir, out_dir = tmp_path / "job", tmp_path / "out"
    job = write_job(cfg, str(job_dir), log=lambda *a: None)
    with Deployment(tmp_path, job_dir, out_dir, "ffa", 3) as d:
        d.superlink()
        for k in range(3):
            d.supernode(k)
        d.submit()
        d.wait_round(out_dir, 1)
        d.kill(d.nodes[1])
        d.wait_round(out_dir, 2)                              # round 2 ran without site 1
        d.supernode(1)
        d.wait_for(out_dir / "metrics.json", timeout=500)
        time.sleep(0.5)
        log = (out_dir / "server.log").read_text()
    journal = ReleaseJournal(str(out_dir / "releases.jsonl"))
    rounds_of = {c: sorted({e["round"] for e in journal.entries if e["ledger"] == f"client{c}"}) for c in range(3)}
    assert rounds_of[0] == rounds_of[2] == [0, 1, 2, 3], (rounds_of, log[-4000:])
    assert 0 in rounds_of[1] and 1 not in rounds_of[1] and 3 in rounds_of[1], (rounds_of, log[-4000:])
    assert "round 2 B: client 1 left out" in log and "partition 1 is now served by SuperNode" in log
    res = json.loads((out_dir / "metrics.json").read_text())
    assert len(res["history"]) == 4 and res["releases"] == len(journal.entries)
    assert set(load_file(str(out_dir / "adapter.safetensors"))) == set(job.init_adapters)


def test_flower_resumes_after_a_superlink_restart(tmp_path, gen):
    """The SuperLink (and the ServerApp under it) is killed while round 2's train messages are out;
    restarted on the same port and database, with the same SuperNodes still running (each first ends
    its pull of the killed run's message), a resubmitted run resumes from its last completed round and ends
    with the adapters of an uninterrupted run with the same seed."""
    from deer.fed import prepare_job
    seed = gen.initial_seed() % 100000
    cfg = _tiny(seed, rounds=3, methods=["ffa"])
    job_dir, out_dir = tmp_path / "job", tmp_path / "out"
    write_job(cfg, str(job_dir), log=lambda *a: None)
    job = prepare_job(cfg, log=lambda *a: None, backbone_path=str(job_dir / "backbone.safetensors"))
    expected = run_method(job, "ffa", log=lambda *a: None)["adapters"]
    with Deployment(tmp_path, job_dir, out_dir, "ffa", 2) as d:
        d.superlink(database=tmp_path / "superlink.db")
        for k in range(2):
            d.supernode(k)
        d.submit()
        d.wait_round(out_dir, 1)
        # flwr numbers rounds from 0: round 2's train message reaching a SuperNode is "ROUND 1.0"
        d.wait_for(d.log_of["supernode0"], done=lambda p: "ROUND 1.0]" in p.read_text(), poll=0.05)
        d.kill(d.link)
        assert json.loads((out_dir / "state.json").read_text())["round"] == 0, "round 2 ended before the kill"
        d.superlink(database=tmp_path / "superlink.db")
        d.submit()
        d.wait_for(out_dir / "metrics.json", timeout=CONNECT_TIMEOUT_S + 400)
        time.sleep(0.5)
        log = (out_dir / "server.log").read_text()
        assert all(p.poll() is None for p in d.nodes.values()), d.logs()   # the SuperNodes reconnected
    assert "resuming after round" in log, log[-4000:]
    got = load_file(str(out_dir / "adapter.safetensors"))
    assert set(got) == set(expected)
    for k, t in expected.items():
        torch.testing.assert_close(got[k], t, rtol=1e-5, atol=1e-6, msg=f"{k} (seed {seed})")


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
    assert res["skipped"] == [{"round": r, "phase": p, "valid": 0, "sampled": 0} for r in range(2) for p in ("B", "A")]
    assert all(torch.equal(res["adapters"][k], t) for k, t in job.init_adapters.items())


FLOWER_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "flower.md")


def _recipe(name):
    with open(FLOWER_MD) as f:
        m = re.search(rf"<!-- flower-recipe: {name} -->\s*```bash\n(.*?)```", f.read(), re.S)
    assert m, f"docs/flower.md lost its flower-recipe: {name} block"
    return m.group(1)


def _kill_groups(groups):
    """Every process in these process groups and everything they spawned, SIGTERM then SIGKILL."""
    import psutil
    victims = {}
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in groups:
                for v in [p] + p.children(recursive=True):
                    victims[v.pid] = v
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            pass
    for sig in ("terminate", "kill"):
        for v in victims.values():
            try:
                getattr(v, sig)()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(victims.values()), timeout=10)
        if not alive:
            break


def test_flower_recipe_with_tls_and_node_authentication(tmp_path, gen):
    """docs/flower.md's deployment commands, run as written on 127.0.0.1 (free ports, a tiny model):
    TLS on every connection, only registered SuperNode keys may join. The run completes with the
    in-process engine's adapters, and a SuperNode with an unregistered key is refused."""
    from deer.fed import load_config, prepare_job
    from deer.fed.flower_app import _site_keys
    seed = gen.initial_seed() % 100000
    port, site_port = _free_port(), _free_port()

    def local(script):
        out = script.replace("10.0.0.5:9093", f"127.0.0.1:{port}") \
            .replace("--host 0.0.0.0 --port 9093", f"--host 127.0.0.1 --port {port}") \
            .replace("9094 + K", f"{site_port} + K")
        assert out != script or "9093" not in script
        return out

    tiny = ["rounds=2", "image_size=8", "partition=iid", "public_fraction=0.2", "public_classes=null",
            "pretrain_epochs=1", "local_steps=2", "batch_size=16", "lr=0.1", "lora_r=2", "lora_alpha=4.0",
            f"seed={seed}", "privacy=sample", "noise_multiplier=0.8", "torch_threads=1",
            "'model_kwargs={img_size: 8, patch_size: 4, embed_dim: 16, depth: 1, num_heads: 2, mlp_ratio: 2.0}'"]
    coordinator = local(_recipe("coordinator"))
    init = next(line for line in coordinator.splitlines() if line.startswith("deer flower init"))
    coordinator = coordinator.replace(init, init + " " + " ".join(tiny))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    env.pop("FLWR_HOME", None)
    groups, logs = set(), {}

    def bash(name, script, wait=True):
        logs[name] = tmp_path / f"{name}.out"
        p = subprocess.Popen(["bash", "-e", "-c", script], cwd=tmp_path, env=env, start_new_session=True,
                             stdout=open(logs[name], "w"), stderr=subprocess.STDOUT)
        groups.add(p.pid)
        if wait:
            p.wait(timeout=300)
        return p

    def show():
        return "\n".join(f"== {f.name}\n" + f.read_text()[-3000:]
                         for f in sorted(list(tmp_path.glob("*.out")) + list((tmp_path / "deploy").glob("*.log"))))

    deploy = tmp_path / "deploy"
    try:
        assert bash("coordinator", coordinator).returncode == 0, show()
        assert {"job", "app", "flwr", "certs", "keys"} <= set(os.listdir(deploy))
        for k in range(2):
            assert bash(f"site{k}", local(_recipe("site")).replace("K=0", f"K={k}", 1)).returncode == 0, show()
        # a SuperNode whose key was never registered, otherwise configured as site 1
        _site_keys(str(tmp_path / "intruder"), 1)
        intruder = local(_recipe("site")).replace("K=0", "K=1", 1).replace(
            "deploy/keys/site$K", str(tmp_path / "intruder" / "site0")).replace("--port $((", "--port $((5 + ")
        intruder = intruder.rstrip().removesuffix("&").replace("deploy/site$K.log", "deploy/intruder.log")
        refused = bash("intruder", intruder, wait=False)
        run = bash("run", local(_recipe("run")))
        assert run.returncode == 0 and "Successfully started run" in logs["run"].read_text(), show()
        assert refused.wait(timeout=120) != 0, show()
        assert "Failed to activate SuperNode" in (deploy / "intruder.log").read_text(), show()
        deadline = time.monotonic() + 400
        while not (deploy / "out" / "metrics.json").exists():
            assert time.monotonic() < deadline, f"the Flower run did not finish in time:\n{show()}"
            time.sleep(1)
        time.sleep(0.5)
        got = load_file(str(deploy / "out" / "adapter.safetensors"))
    finally:
        _kill_groups(groups)
    cfg = load_config(str(deploy / "job" / "config.yaml"))
    job = prepare_job(cfg, log=lambda *a: None, backbone_path=str(deploy / "job" / "backbone.safetensors"))
    expected = run_method(job, "deer", log=lambda *a: None)["adapters"]
    assert set(got) == set(expected)
    for k, t in expected.items():
        torch.testing.assert_close(got[k], t, rtol=1e-5, atol=1e-6, msg=f"{k} (seed {seed})")


def test_flower_one_malicious_site(tmp_path, gen):
    """One of three SuperNodes runs a malicious ClientApp (tests/flower_malicious.py) that sends, one
    round each: a wrong-shape factor, a wrong dtype, a missing layer, an extra tensor, NaN, a 1e30-norm
    update, num-examples = 10^9, a fake release report, and a reply that never comes. The run
    completes; each bad reply is left out or bounded with its logged reason, and the adapters and the
    journal equal the in-process engine's with the same site tampering the same way (one check, both
    transports)."""
    from deer.fed.engine import InProcessClients
    import flower_malicious as M
    seed = gen.initial_seed() % 100000
    cfg = _tiny(seed, rounds=len(M.ROUND_ATTACKS), num_clients=3, clients_per_round=3, methods=["ffa"],
                client_timeout_s=30.0, update_norm_bound=5.0)
    job_dir, out_dir = tmp_path / "job", tmp_path / "out"
    job = write_job(cfg, str(job_dir), log=lambda *a: None)

    class Tampered(InProcessClients):
        def train(self, cids, rnd, si, phase, spec, sigma, start):
            out = super().train(cids, rnd, si, phase, spec, sigma, start)
            out[2] = M.attack(rnd, out[2])
            return out

    expected = run_method(job, "ffa", log=lambda *a: None, clients=Tampered(job))
    with Deployment(tmp_path, job_dir, out_dir, "ffa", 3, clientapp="flower_malicious:client_app") as d:
        d.superlink()
        for k in range(3):
            d.supernode(k, "attack=true" if k == 2 else "")
        d.submit()
        d.wait_for(out_dir / "metrics.json", timeout=600)
        time.sleep(0.5)
        log = (out_dir / "server.log").read_text()
    for rnd, (name, _, said) in enumerate(M.ROUND_ATTACKS):
        assert re.search(rf"round {rnd + 1} B: client 2:? {said}", log), \
            (name, [line for line in log.splitlines() if f"round {rnd + 1} " in line])
    got = load_file(str(out_dir / "adapter.safetensors"))
    assert set(got) == set(expected["adapters"])
    for k, t in expected["adapters"].items():
        torch.testing.assert_close(got[k], t, rtol=1e-5, atol=1e-6, msg=f"{k} (seed {seed})")
    res = json.loads((out_dir / "metrics.json").read_text())
    assert len(res["history"]) == cfg.rounds and res["releases"] == expected["releases"]
    assert res["epsilon"] == pytest.approx(expected["epsilon"], rel=1e-12)
