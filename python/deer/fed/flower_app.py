"""DEeR on Flower: the ServerApp runs deer's own round loop (engine.run_method) with Flower as the
transport to the clients (FlowerClients), and the ClientApp runs deer's local training. Both sides rebuild the same job from a job directory (config.yaml + backbone.safetensors,
written by `write_job`), so the in-process engine and a Flower deployment with the same seeds give
the same global adapters.

Run config keys (pyproject `[tool.flwr.app.config]` or `flwr run -c`):
    job-dir   folder with config.yaml and backbone.safetensors (readable by the server and every client)
    method    deer | deer_no_nr | deer_no_de | ffa | fedavg
    out-dir   the run directory: adapter.safetensors, metrics.json, releases.jsonl, state.json + state.r<N>.safetensors (resume)
Node config (`flower-supernode --node-config`): partition-id=<k> selects client k's data shard.

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

from .. import reference as ref
from ..nn import lora_key
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


class FlowerClients:
    """The round loop's transport (engine.run_method's `clients`) in a Flower deployment: the sampled
    clients of a sub-round train on the SuperNodes serving their partitions. Everything else (schedule,
    sampling, noise, min_clients, aggregation, journal, evaluation, checkpoints) is the in-process
    engine's own loop."""

    def __init__(self, grid, node_of: dict[int, int], timeout: float | None):
        self.grid, self.node_of, self.timeout = grid, node_of, timeout
        self.cid_of = {v: k for k, v in node_of.items()}

    def available(self) -> int:
        return len(set(self.grid.get_node_ids()) & set(self.node_of.values()))

    def train(self, cids, rnd, si, phase, spec, sigma, start) -> dict[int, ClientUpdate | str]:
        from flwr.app import ConfigRecord, Message, RecordDict
        config = ConfigRecord({"round": rnd, "subround": si, "phase": phase, "method": spec.name,
                               "noise-multiplier": float(sigma)})
        msgs = [Message(RecordDict({"adapters": _to_record(start), "config": config}), dst_node_id=self.node_of[cid],
                        message_type="train", group_id=f"{rnd}.{si}") for cid in cids]
        replies: dict[int, ClientUpdate | str] = {cid: f"no reply within {self.timeout}s" for cid in cids}
        for rep in (self.grid.send_and_receive(msgs, timeout=self.timeout) if msgs else []):
            cid = self.cid_of[rep.metadata.src_node_id]
            if rep.has_error():
                replies[cid] = f"client error: {rep.error.reason}"
                continue
            meta = rep.content["metrics"]
            replies[cid] = ClientUpdate(_from_record(rep.content["factors"]), int(meta["num-examples"]),
                                        int(meta["steps"]), float(meta["loss"]),
                                        [tuple(r) for r in json.loads(rep.content["config"]["releases"])])
        return replies


# ----------------------------------------------------------------------------------------------
# ServerApp
# ----------------------------------------------------------------------------------------------

def _connect(grid, cfg: FedConfig, timeout: float) -> dict[int, int]:
    """Wait for the SuperNodes, then learn which node serves which partition: {client: node id}."""
    from flwr.app import ConfigRecord, Message, RecordDict
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < cfg.num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(list(grid.get_node_ids()))} of {cfg.num_clients} SuperNodes connected")
        time.sleep(0.5)
    ask = [Message(RecordDict({"config": ConfigRecord({"ask": "partition-id"})}), dst_node_id=n, message_type="query")
           for n in sorted(grid.get_node_ids())]
    node_of = {}
    for rep in grid.send_and_receive(ask, timeout=timeout):
        if rep.has_error():
            raise RuntimeError(f"node {rep.metadata.src_node_id} failed to report its partition: {rep.error.reason}")
        node_of[int(rep.content["config"]["partition-id"])] = rep.metadata.src_node_id
    missing = sorted(set(range(cfg.num_clients)) - set(node_of))
    if missing:
        raise RuntimeError(f"no SuperNode serves partition(s) {missing}; start one per partition-id 0..{cfg.num_clients - 1}")
    return node_of


def _server_main(grid, context) -> None:
    from flwr.common.logger import log
    rc = context.run_config
    job = load_job(str(rc["job-dir"]))
    node_of = _connect(grid, job.cfg, float(rc.get("connect-timeout", 120)))
    run_method(job, str(rc.get("method", "deer")), str(rc["out-dir"]), log=lambda msg: log(INFO, msg),
               clients=FlowerClients(grid, node_of, job.cfg.client_timeout_s))


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


def _client_train(msg, context):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    job = load_job(str(context.run_config["job-dir"]))
    cfg = job.cfg
    cid = _partition_id(context)
    conf = msg.content["config"]
    rnd, si, phase = int(conf["round"]), int(conf["subround"]), str(conf["phase"])
    spec = method_spec(str(conf["method"]))
    start = _from_record(msg.content["adapters"])
    deadline = time.monotonic() + cfg.client_timeout_s if cfg.client_timeout_s else None
    upd = train_client(job, cid, rnd, si, phase, spec, float(conf["noise-multiplier"]), start, deadline=deadline)
    factors = {k: t for k, t in upd.adapters.items() if lora_key(k)[1] in ref.trained_factors(phase)}
    content = RecordDict({"factors": _to_record(factors),
                          "metrics": MetricRecord({"num-examples": upd.num_examples, "steps": upd.steps,
                                                   "loss": upd.loss if math.isfinite(upd.loss) else -1.0}),
                          "config": ConfigRecord({"releases": json.dumps(upd.releases)})})
    return Message(content, reply_to=msg)


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
