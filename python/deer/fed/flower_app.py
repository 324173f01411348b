"""DEeR on Flower: the ServerApp runs deer's own round loop (engine.run_method) with Flower as the
transport to the clients (FlowerClients), and the ClientApp runs deer's local training. Both sides rebuild the same job from a job directory (config.yaml + backbone.safetensors,
written by `write_job`), so the in-process engine and a Flower deployment with the same seeds give
the same global adapters.

Run config keys (pyproject `[tool.flwr.app.config]` or `flwr run -c`):
    job-dir   folder with config.yaml and backbone.safetensors (readable by the server and every client)
    method    deer | deer_no_nr | deer_no_de | ffa | fedavg (not fedsa: it keeps state on the clients)
    out-dir   the run directory: adapter.safetensors, metrics.json, releases.jsonl, state.json + state.r<N>.safetensors
              (resume), server.log (the ServerApp's log, every run appended)
Node config (`flower-supernode --node-config`): partition-id=<k> selects client k's data shard;
job-dir=<path> where this site keeps the job folder, if not at the coordinator's path.

Only the trained factor travels back: a client's reply carries the factor(s) of the current phase,
and the round loop aggregates exactly those (the frozen factor is already identical everywhere).
"""
from __future__ import annotations

import json
import math
import os
import time
from logging import INFO

import torch

from .client import ClientUpdate
from .config import FedConfig, load_config, method_spec
from .engine import prepare_job, run_method, train_client


def write_job(cfg: FedConfig, job_dir: str, log=print):
    """Prepare a job once (pretraining the backbone if needed) and write what every party needs."""
    import yaml
    os.makedirs(job_dir, exist_ok=True)
    with open(os.path.join(job_dir, "config.yaml"), "w") as f:
        yaml.safe_dump({**cfg.to_dict(), "run_dir": None, "progress": False}, f, sort_keys=False)
    return prepare_job(cfg, log=log, backbone_path=os.path.join(job_dir, "backbone.safetensors"))


_JOBS: dict[str, object] = {}


def load_job(job_dir: str):
    """The job of job_dir, cached per process (a ClientApp process serves many messages)."""
    if job_dir not in _JOBS:
        cfg = load_config(os.path.join(job_dir, "config.yaml"), ["progress=false"])
        if cfg.torch_threads:
            torch.set_num_threads(int(cfg.torch_threads))
        backbone = os.path.join(job_dir, "backbone.safetensors")
        if not os.path.exists(backbone):
            raise ValueError(f"{job_dir} has no backbone.safetensors: create the job with deer.fed.flower_app.write_job")
        _JOBS[job_dir] = prepare_job(cfg, log=lambda *a: None, backbone_path=backbone)
    return _JOBS[job_dir]


def _to_record(state: dict[str, torch.Tensor]):
    from flwr.app import ArrayRecord
    return ArrayRecord({k: v.detach().contiguous() for k, v in state.items()})


def _from_record(rec) -> dict[str, torch.Tensor]:
    return dict(rec.to_torch_state_dict())


def _ask_partitions(grid, nodes, num_clients: int, timeout: float, log) -> dict[int, int]:
    """Ask `nodes` which partition each serves: {partition: node id}. A node that fails to answer, or
    names a partition outside 0..num_clients-1, is logged and left out."""
    from flwr.app import ConfigRecord, Message, RecordDict
    ask = {n: Message(RecordDict({"config": ConfigRecord({"ask": "partition-id"})}), dst_node_id=n,
                      message_type="query") for n in sorted(nodes)}
    if not ask:
        return {}
    replies = list(grid.send_and_receive(list(ask.values()), timeout=timeout))
    node_of_msg = {m.metadata.message_id: n for n, m in ask.items()}   # ids are set when pushed
    found = {}
    for rep in replies:
        node = node_of_msg.get(rep.metadata.reply_to_message_id)
        if node is None:
            continue
        if rep.has_error():
            log(f"SuperNode {node} did not report its partition: {rep.error.reason}")
            continue
        try:
            k = int(rep.content["config"]["partition-id"])
        except (KeyError, TypeError, ValueError) as e:
            log(f"SuperNode {node} sent a malformed partition reply ({type(e).__name__}: {e})")
            continue
        if not 0 <= k < num_clients:
            log(f"SuperNode {node} serves partition-id={k}, outside 0..{num_clients - 1}: not used")
            continue
        found[k] = node
    return found


def _update_of(rep) -> ClientUpdate | str:
    """A train reply as a ClientUpdate, its values as sent (deer.fed.replies checks them), or why not."""
    try:
        meta = rep.content["metrics"]
        factors = _from_record(rep.content["factors"])
        releases = json.loads(rep.content["config"]["releases"])
        return ClientUpdate(factors, meta["num-examples"], meta["steps"], meta["loss"], releases)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"malformed reply ({type(e).__name__}: {e})"


class FlowerClients:
    """The round loop's transport (engine.run_method's `clients`) in a Flower deployment: the sampled
    clients of a sub-round train on the SuperNodes serving their partitions. Everything else (schedule,
    sampling, noise, min_clients, aggregation, journal, evaluation, checkpoints) is the in-process
    engine's own loop.

    Sites are known by partition-id, not node id: before each sub-round, connected nodes not seen yet
    are asked their partition, so a restarted SuperNode (new node id) serves its partition again. A
    reply is matched to its request by message id; Flower's error replies (node unavailable, reply
    lost) leave that site out of the sub-round with the reason, as does no reply within the timeout."""

    def __init__(self, grid, node_of: dict[int, int], timeout: float | None, num_clients: int, log=print):
        self.grid, self.node_of, self.timeout = grid, dict(node_of), timeout
        self.num_clients, self.log = num_clients, log

    def _refresh(self) -> set[int]:
        online = set(self.grid.get_node_ids())
        unknown = online - set(self.node_of.values())
        if unknown:
            # the newest node to claim a partition serves it (a restarted site; its old id may still be
            # listed until the SuperLink's heartbeat check drops it)
            for k, node in _ask_partitions(self.grid, unknown, self.num_clients, self.timeout or 60.0, self.log).items():
                self.log(f"partition {k} is now served by SuperNode {node} (was {self.node_of.get(k)})")
                self.node_of[k] = node
        return online

    def available(self) -> int:
        return len(self._refresh() & set(self.node_of.values()))

    def train(self, cids, rnd, si, phase, spec, sigma, start) -> dict[int, ClientUpdate | str]:
        from flwr.app import ConfigRecord, Message, RecordDict
        online = self._refresh()
        config = ConfigRecord({"round": rnd, "subround": si, "phase": phase, "method": spec.name,
                               "noise-multiplier": float(sigma)})
        replies: dict[int, ClientUpdate | str] = {}
        sent = {}
        for cid in cids:
            node = self.node_of.get(cid)
            if node not in online:
                replies[cid] = "no SuperNode serving its partition is connected"
                continue
            sent[cid] = Message(RecordDict({"adapters": _to_record(start), "config": config}), dst_node_id=node,
                                message_type="train", group_id=f"{rnd}.{si}")
            replies[cid] = f"no reply within {self.timeout}s"
        answers = list(self.grid.send_and_receive(list(sent.values()), timeout=self.timeout)) if sent else []
        cid_of_msg = {m.metadata.message_id: cid for cid, m in sent.items()}
        for rep in answers:
            cid = cid_of_msg.get(rep.metadata.reply_to_message_id)
            if cid is None:
                continue
            replies[cid] = f"error reply: {rep.error.reason}" if rep.has_error() else _update_of(rep)
        return replies


# ----------------------------------------------------------------------------------------------
# ServerApp
# ----------------------------------------------------------------------------------------------

# How long the ServerApp waits for every partition's SuperNode to connect and answer. After a SuperLink
# restart a SuperNode may first spend up to a minute on the killed run's last message (its objects are
# gone with the old SuperLink; Flower keeps pulling until that run's heartbeats lapse, 2 x 30 s, and it
# is marked finished) before it answers the new run, so this must be well above that.
CONNECT_TIMEOUT_S = 300


def _connect(grid, cfg: FedConfig, timeout: float, log) -> dict[int, int]:
    """Wait for the SuperNodes, then learn which node serves which partition: {client: node id}."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < cfg.num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(list(grid.get_node_ids()))} of {cfg.num_clients} SuperNodes connected")
        time.sleep(0.5)
    node_of = _ask_partitions(grid, grid.get_node_ids(), cfg.num_clients, timeout, log)
    missing = sorted(set(range(cfg.num_clients)) - set(node_of))
    if missing:
        raise RuntimeError(f"no SuperNode serves partition(s) {missing}; start one per partition-id 0..{cfg.num_clients - 1}")
    return node_of


def _server_main(grid, context) -> None:
    from flwr.common.logger import log
    rc = context.run_config
    job = load_job(str(rc["job-dir"]))
    out_dir = str(rc["out-dir"])
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "server.log"), "a", buffering=1) as server_log:
        def say(msg):  # to `flwr log` and to <out-dir>/server.log, which keeps every line of every run
            log(INFO, msg)
            server_log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}\n")
        node_of = _connect(grid, job.cfg, float(rc.get("connect-timeout", CONNECT_TIMEOUT_S)), say)
        run_method(job, str(rc.get("method", "deer")), out_dir, log=say,
                   clients=FlowerClients(grid, node_of, job.cfg.client_timeout_s, job.cfg.num_clients, say))


# ----------------------------------------------------------------------------------------------
# ClientApp
# ----------------------------------------------------------------------------------------------

def _partition_id(context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("start the SuperNode with --node-config 'partition-id=<k>' (k = this site's data shard)")
    return int(context.node_config["partition-id"])


def _client_query(msg, context):
    from flwr.app import ConfigRecord, Message, RecordDict
    return Message(RecordDict({"config": ConfigRecord({"partition-id": _partition_id(context)})}), reply_to=msg)


def client_update(msg, context) -> ClientUpdate:
    """What this site trains for one `train` message: its partition, the sub-round's phase and noise."""
    # a site may keep the job folder elsewhere than the coordinator: --node-config "job-dir=<path>"
    job = load_job(str(context.node_config.get("job-dir", context.run_config["job-dir"])))
    cfg = job.cfg
    conf = msg.content["config"]
    rnd, si, phase = int(conf["round"]), int(conf["subround"]), str(conf["phase"])
    deadline = time.monotonic() + cfg.client_timeout_s if cfg.client_timeout_s else None
    return train_client(job, _partition_id(context), rnd, si, phase, method_spec(str(conf["method"])),
                        float(conf["noise-multiplier"]), _from_record(msg.content["adapters"]), deadline=deadline)


def reply_message(msg, upd: ClientUpdate):
    """The reply carrying a site's update: its trained factors, counts and release report."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    content = RecordDict({"factors": _to_record(upd.adapters),
                          "metrics": MetricRecord({"num-examples": upd.num_examples, "steps": upd.steps,
                                                   "loss": upd.loss if math.isfinite(upd.loss) else -1.0}),
                          "config": ConfigRecord({"releases": json.dumps(upd.releases)})})
    return Message(content, reply_to=msg)


def _client_train(msg, context):
    return reply_message(msg, client_update(msg, context))


def _make_apps():
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    server = ServerApp()
    server.main()(_server_main)
    client = ClientApp()
    client.train()(_client_train)
    client.query()(_client_query)
    return server, client


try:  # importing this module without flwr installed must still work (write_job, DeerStrategy)
    server_app, client_app = _make_apps()
except ImportError:  # pragma: no cover
    server_app = client_app = None


# ----------------------------------------------------------------------------------------------
# `deer flower init`: everything a deployment needs, in one folder
# ----------------------------------------------------------------------------------------------

APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "deerflower"
version = "1.0.0"
description = "deer federated LoRA (DEeR) on Flower"
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
method = "{method}"
connect-timeout = {connect_timeout}
"""


def _tls_files(certs: str, host: str, days: int = 365) -> None:
    """A private CA and a SuperLink certificate it signs, valid for `host` (an IP or a DNS name)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def pem_key(key, path):
        with open(path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        os.chmod(path, 0o600)

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deer federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    try:
        alt = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    os.makedirs(certs, exist_ok=True)
    with open(os.path.join(certs, "ca.crt"), "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(certs, "server.pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    pem_key(ca_key, os.path.join(certs, "ca.key"))
    pem_key(key, os.path.join(certs, "server.key"))


def _site_keys(keys: str, sites: int) -> None:
    """One EC key pair per site in OpenSSH format (what flower-supernode --auth-supernode-private-key and
    `flwr supernode register` read)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    os.makedirs(keys, exist_ok=True)
    for k in range(sites):
        key = ec.generate_private_key(ec.SECP384R1())
        path = os.path.join(keys, f"site{k}")
        with open(path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()))
        os.chmod(path, 0o600)
        with open(path + ".pub", "wb") as f:
            f.write(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


def init_deployment(folder: str, cfg: FedConfig, superlink: str, method: str = "deer", insecure: bool = False,
                    connect_timeout: float = CONNECT_TIMEOUT_S, log=print) -> dict[str, str]:
    """Write a complete Flower deployment of `cfg` into `folder`: job/ (config + backbone, what every
    party loads), app/pyproject.toml (deer's ServerApp and ClientApp, the run config), flwr/config.toml
    (the federation "deer" for the flwr CLI: `FLWR_HOME=<folder>/flwr`), and unless insecure, certs/ (a
    private CA and the SuperLink's TLS certificate for the host of `superlink`) and keys/ (one key pair
    per site for SuperNode authentication). Refuses a folder that already holds a deployment."""
    method_spec(method).require_stateless_clients("deer flower init")
    host, sep, port = superlink.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--superlink {superlink!r} must be HOST:PORT, e.g. 10.0.0.5:9093")
    folder = os.path.abspath(folder)
    if os.path.exists(os.path.join(folder, "job")) or os.path.exists(os.path.join(folder, "app")):
        raise ValueError(f"{folder} already holds a deployment (job/ or app/): choose a new folder")
    paths = {k: os.path.join(folder, k) for k in ("job", "app", "out", "flwr", "certs", "keys")}
    write_job(cfg, paths["job"], log=log)
    os.makedirs(paths["app"])
    with open(os.path.join(paths["app"], "pyproject.toml"), "w") as f:
        f.write(APP_PYPROJECT.format(job_dir=paths["job"], out_dir=paths["out"], method=method,
                                     connect_timeout=int(connect_timeout)))
    os.makedirs(paths["flwr"])
    security = "insecure = true" if insecure else f'root-certificates = "{os.path.join(paths["certs"], "ca.crt")}"'
    with open(os.path.join(paths["flwr"], "config.toml"), "w") as f:
        f.write(f'[superlink]\ndefault = "deer"\n\n[superlink.deer]\naddress = "{superlink}"\n{security}\n')
    if not insecure:
        _tls_files(paths["certs"], host.strip("[]"))
        _site_keys(paths["keys"], cfg.num_clients)
    return paths
