"""DEeR on Flower: a ServerApp driving a phase-aware strategy and a ClientApp running deer's local
training. Both sides rebuild the same job from a job directory (config.yaml + backbone.safetensors,
written by `write_job`), so the in-process engine and a Flower deployment with the same seeds give
the same global adapters.

Run config keys (pyproject `[tool.flwr.app.config]` or `flwr run -c`):
    job-dir   folder with config.yaml and backbone.safetensors (readable by the server and every client)
    method    deer | deer_no_nr | deer_no_de | ffa | fedavg
    out-dir   where the server writes adapter.safetensors, metrics.json and releases.jsonl
Node config (`flower-supernode --node-config`): partition-id=<k> selects client k's data shard.

Only the trained factor travels back: a client's reply carries the factor(s) of the current phase,
and the strategy aggregates exactly those (the frozen factor is already identical everywhere).
"""
from __future__ import annotations

import json
import math
import os
import time
from logging import INFO, WARNING

import torch

from .accounting import ReleaseJournal
from .config import FedConfig, load_config, method_spec
from .engine import (calibrate_noise, client_rate, prepare_job, sample_clients, server_aggregate, skip_reason,
                     train_client)
from .metrics import evaluate
from .model import AdapterState, flatten_adapters, set_adapters, unflatten_adapters


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


class DeerStrategy:
    """Server side of one method: the schedule of sub-rounds (phase per sub-round), client sampling,
    noise calibration, aggregation of only the trained factor, client-level DP and the privacy journal.
    The in-process engine applies the same rules with the same keyed random streams."""

    def __init__(self, job, method: str, journal: ReleaseJournal, log):
        self.job, self.cfg, self.spec = job, job.cfg, method_spec(method)
        self.sigma, self.how = calibrate_noise(self.cfg, self.spec, job.data)
        self.journal, self.log = journal, log
        self.adapters: AdapterState = {n: {f: t.clone() for f, t in d.items()} for n, d in job.init_adapters.items()}
        self.history: list[dict] = []
        self.skipped: list[dict] = []

    def configure(self, rnd: int, si: int, phase: str, available: int | None = None) -> tuple[list[int], dict, dict] | None:
        """(sampled clients, flat global adapters, train config) for the sub-round, or None when the
        min_clients rule skips it before any client is asked (client level with q < 1: fewer than
        min_clients of the clients are `available`, i.e. connected)."""
        cfg = self.cfg
        why = skip_reason(cfg, 0, 0, available) if (cfg.privacy == "client" and client_rate(cfg) < 1) else None
        if why:
            self.log(WARNING, f"round {rnd + 1} {phase}: skipped, {why}; nothing released")
            self.skipped.append({"round": rnd, "phase": phase, "valid": 0})
            return None
        config = {"round": rnd, "subround": si, "phase": phase, "method": self.spec.name,
                  "noise-multiplier": float(self.sigma)}
        return sample_clients(cfg, rnd, si), flatten_adapters(self.adapters), config

    def aggregate(self, rnd: int, si: int, phase: str, replies: dict[int, dict]) -> None:
        """replies: client id -> {"factors": flat trained factors, "num_examples", "releases"} or {"error"}.
        The same rules as the in-process engine (engine.skip_reason, engine.server_aggregate)."""
        cfg = self.cfg
        valid = {}
        received = 0
        for cid in sorted(replies):
            r = replies[cid]
            if "error" in r:
                self.log(WARNING, f"round {rnd + 1} {phase}: client {cid} left out: {r['error']}")
                continue
            received += 1
            if cfg.privacy == "sample":
                for s, q, k in r["releases"]:
                    self.journal.record(f"client{cid}", rnd, phase, s, q, k)
            local = {n: {f: t.clone() for f, t in d.items()} for n, d in self.adapters.items()}
            for n, d in unflatten_adapters(r["factors"]).items():
                if n not in local or set(d) != ({"A", "B"} if phase == "AB" else {phase}):
                    self.log(WARNING, f"round {rnd + 1} {phase}: client {cid} left out: reply has factors "
                                      f"{sorted(d)} for layer {n}, expected the {phase} factor(s) only")
                    break
                local[n].update(d)
            else:
                if all(torch.isfinite(t).all() for d in local.values() for t in d.values()):
                    valid[cid] = (local, float(r["num_examples"]))
                else:
                    self.log(WARNING, f"round {rnd + 1} {phase}: client {cid} left out: non-finite (NaN/Inf) factors")
        why = skip_reason(cfg, len(valid), received)
        if why:
            self.log(WARNING, f"round {rnd + 1} {phase}: skipped, {why}; nothing released")
            self.skipped.append({"round": rnd, "phase": phase, "valid": len(valid)})
            return
        rel = server_aggregate(cfg, self.spec, self.sigma, self.adapters, valid, rnd, si, phase)
        if cfg.privacy == "client":
            self.journal.record("server", rnd, phase, rel.noise_multiplier, client_rate(cfg), 1)
        self.adapters = rel.adapters


# ----------------------------------------------------------------------------------------------
# ServerApp
# ----------------------------------------------------------------------------------------------

def _server_main(grid, context) -> None:
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.logger import log

    rc = context.run_config
    job_dir, method, out_dir = str(rc["job-dir"]), str(rc.get("method", "deer")), str(rc["out-dir"])
    os.makedirs(out_dir, exist_ok=True)
    job = load_job(job_dir)
    cfg = job.cfg
    strategy = DeerStrategy(job, method, ReleaseJournal(os.path.join(out_dir, "releases.jsonl")), log)
    log(INFO, f"[deer] {strategy.spec.label}: phases {list(strategy.spec.phases)}, privacy {cfg.privacy}, "
              f"sigma {strategy.sigma:.4g}")
    # Wait for the clients, then learn which node holds which partition.
    deadline = time.monotonic() + float(rc.get("connect-timeout", 120))
    while len(list(grid.get_node_ids())) < cfg.num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(list(grid.get_node_ids()))} of {cfg.num_clients} SuperNodes connected")
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    ask = [Message(RecordDict({"config": ConfigRecord({"ask": "partition-id"})}), dst_node_id=n, message_type="query")
           for n in nodes]
    node_of = {}
    for rep in grid.send_and_receive(ask, timeout=float(rc.get("connect-timeout", 120))):
        if rep.has_error():
            raise RuntimeError(f"node {rep.metadata.src_node_id} failed to report its partition: {rep.error.reason}")
        node_of[int(rep.content["config"]["partition-id"])] = rep.metadata.src_node_id
    missing = sorted(set(range(cfg.num_clients)) - set(node_of))
    if missing:
        raise RuntimeError(f"no SuperNode serves partition(s) {missing}; start one per partition-id 0..{cfg.num_clients - 1}")
    timeout = cfg.client_timeout_s
    model = job.model
    for rnd in range(cfg.rounds):
        for si, phase in enumerate(strategy.spec.phases):
            available = len(set(grid.get_node_ids()) & set(node_of.values()))
            plan = strategy.configure(rnd, si, phase, available)
            if plan is None:
                continue
            sampled, flat, config = plan
            msgs = []
            for cid in sampled:
                content = RecordDict({"adapters": _to_record(flat), "config": ConfigRecord(config)})
                msgs.append(Message(content, dst_node_id=node_of[cid], message_type="train", group_id=f"{rnd}.{si}"))
            cid_of = {v: k for k, v in node_of.items()}
            replies: dict[int, dict] = {cid: {"error": f"no reply within {timeout}s"} for cid in sampled}
            for rep in (grid.send_and_receive(msgs, timeout=timeout) if msgs else []):
                cid = cid_of[rep.metadata.src_node_id]
                if rep.has_error():
                    replies[cid] = {"error": f"client error: {rep.error.reason}"}
                    continue
                meta = rep.content["metrics"]
                releases = json.loads(rep.content["config"]["releases"])
                replies[cid] = {"factors": _from_record(rep.content["factors"]),
                                "num_examples": meta["num-examples"], "releases": releases}
            strategy.aggregate(rnd, si, phase, replies)
        set_adapters(model, strategy.adapters)
        row = {"round": rnd + 1, **evaluate(model, job.data.test.x, job.data.test.y, job.data.num_classes),
               "epsilon": strategy.journal.epsilon(cfg.delta) if cfg.privacy != "none" else 0.0}
        strategy.history.append(row)
        log(INFO, f"[deer] round {rnd + 1}/{cfg.rounds}: acc {row['accuracy']:.3f} eps {row['epsilon']:.3f}")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in flatten_adapters(strategy.adapters).items()},
              os.path.join(out_dir, "adapter.safetensors"))
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({"method": strategy.spec.name, "history": strategy.history, "skipped": strategy.skipped,
                   "noise_multiplier": strategy.sigma, "epsilon": strategy.journal.epsilon(cfg.delta)
                   if cfg.privacy != "none" else 0.0}, f, indent=1, default=float)


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
    start = unflatten_adapters(_from_record(msg.content["adapters"]))
    deadline = time.monotonic() + cfg.client_timeout_s if cfg.client_timeout_s else None
    upd = train_client(job, cid, rnd, si, phase, spec, float(conf["noise-multiplier"]), start, deadline=deadline)
    trained = ("A", "B") if phase == "AB" else (phase,)
    factors = {f"{n}.lora_{f}": d[f] for n, d in upd.adapters.items() for f in trained}
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
