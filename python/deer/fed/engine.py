"""In-process federated engine: one backbone in memory, clients trained one after another.

    job = prepare_job(cfg)                    # data split, backbone (pretrained or loaded), LoRA init
    result = run_method(job, "deer", run_dir) # rounds of sub-rounds, evaluation, checkpoints

Every random stream is keyed by (seed, role, client, round, sub-round), so a client's local training
(record sampling, DP noise) and the server's client sampling and noise are the same whichever engine
(in-process or Flower) runs them and whether the run was resumed.

Client sampling (`sample_clients`): at client level Poisson sampling, every client independently with
q = clients_per_round / num_clients, redrawn for every sub-round (each sub-round is one release, and the
accountant composes one Poisson subsampled Gaussian per release); otherwise a fixed number of clients
per round. Faults: a client that raises, passes its deadline, or returns non-finite adapters is left
out of that sub-round with a logged reason. The min_clients rule (`skip_reason`) skips a sub-round
(nothing released, global adapters unchanged, nothing charged) only on information that reveals
nothing private: see skip_reason and docs/privacy.md section 8.1. Resume: the adapters, metrics and
round counter are checkpointed after every completed round (deer.fed.rundir); every privacy release is appended
(and fsynced) to releases.jsonl the moment it happens, so a killed run resumes from its last
completed round and its epsilon still counts the releases of the round it was killed in.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .. import reference as ref
from ..data import FedData, prepare_data
from ..nn import LoRAConfig, LoRAState, get_lora_state, inject_lora, lora_key, set_lora_state
from .accounting import ReleaseJournal, noise_for_budget
from .aggregate import aggregate
from .client import ClientUpdate, LocalTrainConfig, local_steps, local_train
from .config import ConfigError, FedConfig, MethodSpec, method_spec
from .metrics import evaluate
from . import replies as replies_mod
from .rundir import RunDir, RunDirError, read_safetensors, write_safetensors
from .model import build_backbone, pretrain

ROLE_CODE = {"client": 1, "server": 2, "sample": 3, "init": 4, "pretrain": 5, "noise": 6}


def stream_seed(seed: int, role: str, *keys: int) -> int:
    """A 63-bit seed for the stream (seed, role, keys...) via numpy's SeedSequence hashing."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, ROLE_CODE[role], *[int(k) for k in keys]])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def generator(seed: int, role: str, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, role, *keys))


def client_rate(cfg: FedConfig) -> float:
    """q = clients_per_round / num_clients: the client-level sampling rate the accountant is charged."""
    return cfg.clients_per_round / cfg.num_clients


def sample_clients(cfg: FedConfig, rnd: int, si: int = 0) -> list[int]:
    """The clients that train in sub-round `si` of round `rnd`.

    Client level: Poisson sampling, each client independently with probability q, from a fresh
    keyed draw for every sub-round (the realised number varies, may be 0, and is never used as a
    normaliser). Sample level / no privacy: exactly clients_per_round clients without replacement, the
    same for all sub-rounds of a round (no amplification by client sampling is claimed at sample level:
    each client is charged for the steps it actually ran)."""
    if cfg.clients_per_round == cfg.num_clients:
        return list(range(cfg.num_clients))
    if cfg.privacy == "client":
        rng = np.random.default_rng(stream_seed(cfg.seed, "sample", rnd, si))
        return [int(c) for c in np.flatnonzero(rng.random(cfg.num_clients) < client_rate(cfg))]
    rng = np.random.default_rng(stream_seed(cfg.seed, "sample", rnd))
    return sorted(int(c) for c in rng.choice(cfg.num_clients, cfg.clients_per_round, replace=False))


def skip_reason(cfg: FedConfig, valid: int, received: int, available: int | None = None) -> str | None:
    """Why a sub-round must be skipped under the min_clients rule (None: aggregate and release).

    A skip releases nothing and is not charged, so the decision itself must reveal nothing private:
    * none / sample level: skipping is post-processing of the clients' (already private) updates;
      compared with the number of valid updates.
    * client level, q = 1: no sampling coins are involved; compared with the number of updates
      received (non-finite ones included: they may be caused by the data, and are aggregated as a zero
      contribution), so the decision depends only on crashes and timeouts, assumed independent of the
      clients' data.
    * client level, q < 1: any threshold on the realised sample would depend on whether a pivotal
      client was sampled, voiding the amplification the accountant credits. The rule applies before
      the draw, to the clients available to sample from (`available`); after the draw every sub-round
      releases, even with an empty sum (noise alone), and is charged."""
    if cfg.privacy == "client":
        if client_rate(cfg) < 1:
            if available is not None and available < cfg.min_clients:
                return f"{available} clients available < min_clients={cfg.min_clients}"
            return None
        n, what = received, "client updates received"
    else:
        n, what = valid, "valid client updates"
    return f"{n} {what} < min_clients={cfg.min_clients}" if n < cfg.min_clients else None


def local_config(cfg: FedConfig, sigma: float) -> LocalTrainConfig:
    return LocalTrainConfig(cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.privacy, sigma, cfg.max_grad_norm,
                            cfg.lam, cfg.local_steps, cfg.backend, cfg.momentum, cfg.weight_decay)


def train_client(job: "Job", cid: int, rnd: int, si: int, phase: str, spec: MethodSpec, sigma: float,
                 start: LoRAState, *, deadline: float | None = None, hook=None) -> ClientUpdate:
    """Client `cid`'s local training in sub-round `si` of round `rnd` with its keyed streams (the
    in-process engine and the Flower ClientApp both call this)."""
    cfg = job.cfg
    cd = job.data.clients[cid]
    upd = local_train(job.model, start, cd.x, cd.y, phase, spec, local_config(cfg, sigma),
                      generator(cfg.seed, "client", cid, rnd, si), deadline=deadline, hook=hook,
                      noise_seed=stream_seed(cfg.seed, "noise", cid, rnd, si), client=cid)
    # a reply carries the phase's trained and shared factor(s) only: the frozen one is the server's own,
    # a personal one (MethodSpec.shared) stays on the client
    trained, sent = ref.trained_factors(phase), ref.trained_factors(spec.sent(phase))
    upd.personal = {k: t for k, t in upd.adapters.items() if lora_key(k)[1] in trained and lora_key(k)[1] not in sent}
    upd.adapters = {k: t for k, t in upd.adapters.items() if lora_key(k)[1] in sent}
    return upd


@dataclass
class ServerRelease:
    adapters: LoRAState
    ids: list[int]
    weights: list[float]
    noise_multiplier: float | None   # client level: the release's multiplier (charged at rate q)


def server_aggregate(cfg: FedConfig, spec: MethodSpec, sigma: float, global_state: LoRAState,
                     valid: dict[int, tuple[LoRAState, float]], rnd: int, si: int, phase: str) -> ServerRelease:
    """Aggregate the valid updates {client: (adapters, num_examples)} of one sub-round. Client level:
    clipped sum + noise over the expected number of participants q N (see aggregate.py)."""
    ids = sorted(valid)
    client = cfg.privacy == "client"
    weights = [1.0] * len(ids) if (cfg.weighting == "uniform" or client) else [float(valid[c][1]) for c in ids]
    agg = aggregate(global_state, [valid[c][0] for c in ids], weights, spec.sent(phase), spec.mechanism.replace(lam=cfg.lam),
                    privacy=cfg.privacy, noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm,
                    generator=generator(cfg.seed, "server", rnd, si),
                    denominator=client_rate(cfg) * cfg.num_clients if client else None)
    return ServerRelease(agg.adapters, ids, weights, agg.noise_multiplier)


@dataclass
class Job:
    """Everything shared by the methods of one run: the data split and the backbone with its
    initial (seeded) LoRA adapters (deer.nn.get_lora_state names), injected as `lora` says."""
    cfg: FedConfig
    data: FedData
    model: nn.Module
    init_adapters: LoRAState
    lora: LoRAConfig
    notes: list[str] = field(default_factory=list)


def prepare_job(cfg: FedConfig, log=print, backbone_path: str | None = None) -> Job:
    """Split the data, build the backbone and inject LoRA. The backbone is loaded from
    `backbone_path` when that file exists (resume, Flower clients), else from cfg.checkpoint, else
    pretrained non-privately on the public split (and saved to backbone_path when given)."""
    data = prepare_data(cfg.dataset, num_clients=cfg.num_clients, partition=cfg.partition, alpha=cfg.alpha,
                        seed=cfg.seed, image_size=cfg.image_size, mode=cfg.image_mode,
                        public_fraction=0.0 if cfg.checkpoint else cfg.public_fraction,
                        public_classes=cfg.public_classes, test_fraction=cfg.test_fraction,
                        val_fraction=cfg.val_fraction)
    notes = []
    on_clients = set(torch.cat([c.y for c in data.clients]).tolist()) if data.clients else set()
    absent = [data.test.classes[k] for k in range(data.num_classes) if k not in on_clients]
    if absent:   # said before any pretraining: the private fine-tuning has no record of these classes
        log(f"[deer] WARNING: class(es) {absent} have no training records on any client (all their records are in "
            "the test or public split): fine-tuning cannot learn them, and per-class metrics for them measure "
            "the backbone alone")
    model = build_backbone(cfg.model, data.num_classes, data.test.in_chans, cfg.model_kwargs,
                           cfg.checkpoint, log=log)
    lora = cfg.lora_config()
    too_large = lora.too_large(model)   # before any pretraining
    if too_large:
        raise ConfigError(f"lora_r={cfg.lora_r} (or lora_rank_pattern) exceeds the largest rank, min(out, in), of "
                          f"the target layer(s) {too_large}: set lora_r <= {min(too_large.values())}, or give those "
                          f"layers their own rank, e.g. lora_rank_pattern={ {n: v for n, v in too_large.items()} }")
    if backbone_path and os.path.exists(backbone_path):
        model.load_state_dict(read_safetensors(backbone_path, "the pretrained backbone"))
        notes.append(f"backbone: {cfg.model} loaded from {backbone_path}")
    elif cfg.checkpoint:
        notes.append(f"backbone: {cfg.model} with weights from {cfg.checkpoint}")
    elif cfg.pretrain_epochs > 0 and data.public is not None and len(data.public):
        torch.manual_seed(stream_seed(cfg.seed, "pretrain"))
        model = build_backbone(cfg.model, data.num_classes, data.test.in_chans, cfg.model_kwargs, log=log)
        t0 = time.time()
        loss = pretrain(model, data.public.x, data.public.y, cfg.pretrain_epochs, cfg.pretrain_lr,
                        stream_seed(cfg.seed, "pretrain", 1))
        cls = sorted(set(data.public.y.tolist()))
        notes.append(f"backbone: {cfg.model} {cfg.model_kwargs} pretrained NON-privately on the public split "
                     f"({len(data.public)} images, classes {cls}, {cfg.pretrain_epochs} epochs, loss {loss:.3f}, "
                     f"{time.time() - t0:.1f}s); the clients' private split is disjoint from it")
    else:
        notes.append(f"backbone: {cfg.model} randomly initialised (no checkpoint, no pretraining)")
    if backbone_path and not os.path.exists(backbone_path):
        write_safetensors(model.state_dict(), backbone_path)
    inject_lora(model, lora, seed=stream_seed(cfg.seed, "init"))
    return Job(cfg, data, model, get_lora_state(model), lora, notes)


def calibrate_noise(cfg: FedConfig, spec: MethodSpec, data: FedData) -> tuple[float, str]:
    """The noise multiplier for a method, and how it was chosen. Each method gets the multiplier that
    spends exactly the target budget over its own number of releases (DEeR releases twice per round)."""
    if cfg.privacy == "none":
        return 0.0, "no privacy"
    subrounds = cfg.rounds * len(spec.phases)
    if cfg.noise_multiplier is not None:
        return float(cfg.noise_multiplier), "fixed noise multiplier"
    if cfg.privacy == "client":
        q = cfg.clients_per_round / cfg.num_clients
        s = noise_for_budget(cfg.target_epsilon, cfg.delta, q, subrounds)
        return s, f"client level: {subrounds} releases at q={q:.3g} -> eps {cfg.target_epsilon}"
    # sample level: worst case over clients, each assumed to take part in every sub-round
    pairs = {(min(1.0, cfg.batch_size / len(c)),
              subrounds * (cfg.local_steps or local_steps(len(c), cfg.batch_size, cfg.local_epochs)))
             for c in data.clients}
    # epsilon grows with q at a fixed step count: per step count only the largest q matters
    worst = {}
    for q, k in pairs:
        worst[k] = max(worst.get(k, 0.0), q)
    s = max(noise_for_budget(cfg.target_epsilon, cfg.delta, q, k) for k, q in worst.items())
    return s, (f"sample level: worst client, (q, steps) in {sorted((round(q, 4), k) for k, q in worst.items())} "
               f"-> eps {cfg.target_epsilon}")


ClientHook = Callable[[int, int, str, int, nn.Module], None]   # (client, round, phase, step, model)
AggregateHook = Callable[[dict], None]


class InProcessClients:
    """The default transport of the round loop: every sampled client trains here, one after another,
    on job.model (reset to the global adapters after each). Flower's transport (flower_app) sends the
    same work to SuperNodes instead."""

    def __init__(self, job: "Job", client_hook: ClientHook | None = None):
        self.job, self.client_hook = job, client_hook
        # each client's personal factors (MethodSpec.shared), kept here between its sub-rounds as the
        # client itself would; the round loop checkpoints and restores them
        self.personal: dict[int, LoRAState] = {}

    def available(self) -> int:
        return self.job.cfg.num_clients

    def train(self, cids: list[int], rnd: int, si: int, phase: str, spec: MethodSpec, sigma: float,
              start: LoRAState) -> dict[int, ClientUpdate | str]:
        cfg, out = self.job.cfg, {}
        cbar = _progress(cfg, total=len(cids), desc=f"  round {rnd + 1} {phase}", leave=False)
        for cid in cids:
            hook = None
            if self.client_hook:
                hook = lambda step, m, _c=cid: self.client_hook(_c, rnd, phase, step, m)  # noqa: E731
            deadline = time.monotonic() + cfg.client_timeout_s if cfg.client_timeout_s else None
            try:
                upd = train_client(self.job, cid, rnd, si, phase, spec, sigma, {**start, **self.personal.get(cid, {})},
                                   deadline=deadline, hook=hook)
                bad = [k for k, t in upd.personal.items() if not torch.isfinite(t).all()]
                if bad:   # diverged: the client keeps the factors it had and sends nothing this sub-round
                    out[cid] = (f"its own factors {bad[:2]} are not finite after local training (it keeps the ones "
                                f"it had)")
                else:
                    out[cid] = upd
                    if upd.personal:
                        self.personal[cid] = upd.personal
            except Exception as e:  # noqa: BLE001  a failing client must not end the run
                out[cid] = f"{type(e).__name__}: {e}"
            finally:
                set_lora_state(self.job.model, start)
            cbar.update()
        cbar.close()
        return out


def run_method(job: Job, method: str, run_dir: str | None = None, *, log=print,
               client_hook: ClientHook | None = None, on_aggregate: AggregateHook | None = None,
               clients=None) -> dict:
    """Run (or resume) one method; returns {"method", "label", "history", "epsilon", ...}. The one
    round loop of deer.fed: schedule, client sampling, noise calibration, the min_clients rule,
    aggregation, the privacy journal, evaluation and checkpoints.

    clients: the transport that trains the sampled clients of a sub-round (`available()`, `train(...)`
    -> {client: ClientUpdate or why it has none}): InProcessClients(job, client_hook) by default, the
    Flower ServerApp's grid in a deployment. on_aggregate(info) is called after every aggregation with
    the round, phase, the global adapters before and after, the valid clients' adapters and their
    weights (the deviation test uses it)."""
    cfg, data = job.cfg, job.data
    spec = method_spec(method)
    if clients is None:
        clients = InProcessClients(job, client_hook)
    elif client_hook is not None:
        raise ValueError("client_hook applies to the in-process clients only")
    if not isinstance(clients, InProcessClients):
        spec.require_stateless_clients("run_method")
    sigma, how = calibrate_noise(cfg, spec, data)
    rundir = RunDir(run_dir) if run_dir else None
    try:
        return _run_rounds(job, spec, sigma, how, rundir, clients, log, on_aggregate)
    finally:
        if rundir:
            rundir.close()


def _run_rounds(job: Job, spec: MethodSpec, sigma: float, how: str, rundir, clients, log, on_aggregate) -> dict:
    cfg, data, model = job.cfg, job.data, job.model
    journal = rundir.journal if rundir else ReleaseJournal(None)
    global_state = {k: t.clone() for k, t in job.init_adapters.items()}
    history, skipped, start = [], [], 0
    personal = clients.personal if isinstance(clients, InProcessClients) else {}
    st = rundir.load(cfg.fingerprint(), spec.name) if rundir else None
    if st is not None:
        global_state, history, skipped = st["adapters"], st["history"], st["skipped"]
        global_state, kept = _split_personal(global_state)
        personal.clear()
        personal.update(kept)
        try:
            set_lora_state(model, global_state, strict=True)
        except (KeyError, ValueError) as e:
            raise RunDirError(f"{rundir.path} holds adapters this model does not have (written by another deer "
                              f"version?): {e}") from None
        start = st["round"] + 1
        log(f"[{spec.label}] resuming after round {start} of {cfg.rounds}; privacy journal has "
            f"{len(journal.entries)} releases (epsilon so far {journal.epsilon(cfg.delta):.3f})")
    elif journal.entries:
        log(f"[{spec.label}] killed before its first round completed; restarting at round 1, keeping "
            f"{len(journal.entries)} releases in the privacy journal")
    def over_target(when: str) -> None:
        """A resumed run recounts the releases of the round it was killed in, and its redo releases
        again: it can pass target_epsilon. Say so; the count itself is never cut."""
        if journal.entries and cfg.privacy != "none" and cfg.noise_multiplier is None \
                and journal.epsilon(cfg.delta) > cfg.target_epsilon * (1 + 1e-9):
            log(f"[{spec.label}] WARNING: {when} the privacy journal's {len(journal.entries)} releases spend epsilon "
                f"{journal.epsilon(cfg.delta):.3f}, above target_epsilon={cfg.target_epsilon} (a killed round's "
                f"releases are counted, and its redo releases again)")

    over_target("before resuming,")
    if start == 0 and not history:
        log(f"[{spec.label}] phases per round {list(spec.phases)}, mechanism {spec.mechanism.replace(lam=cfg.lam).name}, "
            f"privacy {cfg.privacy}" + (f", noise multiplier {sigma:.4g} ({how}), C={cfg.max_grad_norm}, "
                                         f"lambda={cfg.lam}, delta={cfg.delta}" if cfg.privacy != "none" else ""))
        if cfg.privacy == "client":
            # the aggregate's noise, of norm about sigma C sqrt(d) / clients_per_round over the d trained
            # entries of a sub-round, against the mean of clipped updates, of norm at most C
            d = max(sum(t.numel() for k, t in job.init_adapters.items()
                        if lora_key(k)[1] in ref.trained_factors(spec.sent(p))) for p in spec.phases)
            need = sigma * math.sqrt(d)
            if need > cfg.clients_per_round:
                log(f"[{spec.label}] WARNING: this configuration is unlikely to learn: at client level the noise on "
                    f"the aggregate (norm about sigma C sqrt(d) / clients_per_round = {need / cfg.clients_per_round:.3g} C, "
                    f"sigma {sigma:.3g}, d = {d} trained entries) is larger than any mean of clipped updates (at most "
                    f"C). They balance at about {need:.0f} expected participants per sub-round: more clients, fewer "
                    f"trained entries (lora_r, lora_targets), or a larger budget")
    set_lora_state(model, job.init_adapters)  # B = 0: the pretrained backbone's own predictions
    initial = evaluate(model, data.test.x, data.test.y, data.num_classes)
    if start == 0 and not history:
        log(f"[{spec.label}] before fine-tuning: acc {initial['accuracy']:.3f}  F1 {initial['f1']:.3f}  "
            f"AUC {initial['auc']:.3f}")
    bar = _progress(cfg, total=cfg.rounds, initial=start, desc=spec.label)
    for rnd in range(start, cfg.rounds):
        t0 = time.time()
        for si, phase in enumerate(spec.phases):
            where = f"[{spec.label}] round {rnd + 1} {phase}"
            # client level, q < 1: the min_clients rule applies before the draw (skip_reason)
            why = skip_reason(cfg, 0, 0, clients.available()) \
                if cfg.privacy == "client" and client_rate(cfg) < 1 else None
            sampled, valid = [], {}
            if not why:
                sampled = sample_clients(cfg, rnd, si)
                replies = clients.train(sampled, rnd, si, phase, spec, sigma, global_state)
                valid, received = _collect(job, spec, sigma, journal, global_state, rnd, phase, replies, log, where)
                why = skip_reason(cfg, len(valid), received)
            if why:
                log(f"{where}: skipped, {why}; global adapters unchanged, nothing released")
                skipped.append({"round": rnd, "phase": phase, "valid": len(valid), "sampled": len(sampled)})
                continue
            rel = server_aggregate(cfg, spec, sigma, global_state, valid, rnd, si, phase)
            if cfg.privacy == "client":
                journal.record("server", rnd, phase, rel.noise_multiplier, client_rate(cfg), 1)
            if on_aggregate:
                on_aggregate({"round": rnd, "phase": phase, "before": global_state, "after": rel.adapters,
                              "clients": [valid[c][0] for c in rel.ids], "weights": rel.weights,
                              "ids": rel.ids, "sampled": sampled})
            global_state = rel.adapters
        row = {"round": rnd + 1, **_score(job, global_state, personal, data.test),
               "epsilon": journal.epsilon(cfg.delta) if cfg.privacy != "none" else 0.0,
               "seconds": time.time() - t0}
        if data.val is not None:
            row["val"] = _score(job, global_state, personal, data.val)
        set_lora_state(model, global_state)
        history.append(row)
        log(f"[{spec.label}] round {rnd + 1}/{cfg.rounds}: acc {row['accuracy']:.3f}  F1 {row['f1']:.3f}  "
            f"AUC {row['auc']:.3f}  eps {row['epsilon']:.3f}  ({row['seconds']:.1f}s)")
        if not math.isfinite(row["accuracy"]):
            log(f"[{spec.label}] WARNING: round {rnd + 1}: the model's outputs on the test set are not finite: the "
                f"adapters diverged (finite but huge). Lower lr, or bound each update with update_norm_bound")
        if rundir:
            rundir.save(rnd, _join_personal(global_state, personal), history, skipped, cfg.fingerprint(), spec.name)
        bar.update()
    bar.close()
    over_target("at the end of the run,")
    eps = journal.epsilon(cfg.delta) if cfg.privacy != "none" else 0.0
    result = {"method": spec.name, "label": spec.label, "privacy": cfg.privacy, "noise_multiplier": sigma,
              "noise_calibration": how, "delta": cfg.delta, "epsilon": eps,
              # whose accounting epsilon is: the server's own releases, or the sites' checked reports
              "accounting": {"client": "server", "sample": "sites' reports"}.get(cfg.privacy), "history": history,
              "skipped": skipped, "releases": len(journal.entries), "initial": initial,
              "final": history[-1] if history else {},
              # model selection on the public validation split: the round with the best val accuracy
              "best": max(history, key=lambda r: r["val"]["accuracy"] if math.isfinite(r["val"]["accuracy"]) else -1.0)
              if history and data.val is not None else None}
    if rundir:
        # deer.privacy.checkpoint.save_lora_state's format: load with load_lora_state(model, path)
        write_safetensors(global_state, os.path.join(rundir.path, "adapter.safetensors"))
        metrics = os.path.join(rundir.path, "metrics.json")
        with open(metrics + ".tmp", "w") as f:
            json.dump(result, f, indent=1, default=float)
        os.replace(metrics + ".tmp", metrics)
    result["adapters"] = global_state
    return result


def _collect(job: Job, spec: MethodSpec, sigma: float, journal: ReleaseJournal, global_state: LoRAState, rnd: int,
             phase: str, replies: dict[int, ClientUpdate | str], log, where: str
             ) -> tuple[dict[int, tuple[LoRAState, float]], int]:
    """The valid updates {client: (global adapters with its trained factors, num_examples)} of one
    sub-round, and how many clients replied. Every reply is checked against what the server sent
    (deer.fed.replies); one that fails is left out with its reason. A client's sample-level releases
    are charged as soon as its update arrives (it has left the client), valid or not, provided its
    report is consistent with the job's config; an inconsistent report is left out with its update."""
    cfg = job.cfg
    valid, received = {}, 0
    mech = spec.mechanism
    for cid in sorted(replies):
        upd = replies[cid]
        if isinstance(upd, str):
            log(f"{where}: client {cid} left out: {upd}")
            continue
        received += 1
        n = len(job.data.clients[cid].y)
        exp = replies_mod.expected(
            global_state, spec.sent(phase), n, **(dict(
                sample_rate=min(1.0, cfg.batch_size / n),
                steps=cfg.local_steps or local_steps(n, cfg.batch_size, cfg.local_epochs),
                sigma=sigma if mech.matched else None) if cfg.privacy == "sample" else {}))
        try:
            if cfg.privacy == "sample":
                for s, q, k in replies_mod.check_releases(upd.releases, exp):
                    journal.record(f"client{cid}", rnd, phase, s, q, k)
            got, weight, note = replies_mod.check_update(upd.adapters, upd.num_examples, exp)
        except replies_mod.Rejected as e:
            log(f"{where}: client {cid} left out: {e}")
            continue
        if note:
            log(f"{where}: client {cid}: {note}")
        if cfg.update_norm_bound is not None:
            got, note = replies_mod.bound_update(got, exp, cfg.update_norm_bound)
            if note:
                log(f"{where}: client {cid}: {note}")
        valid[cid] = ({**global_state, **got}, weight)
    return valid, received


def _score(job: Job, global_state: LoRAState, personal: dict[int, LoRAState], split) -> dict:
    """Metrics of the global adapters on a split; with personal factors (FedSA-LoRA), the mean over all
    clients of each one's own model (global adapters + its personal factors; a client that has not
    trained yet has the global ones). The simulation scores them centrally; a deployment would score
    each client's model at the client. Leaves the model's adapters unspecified."""
    model, k = job.model, job.data.num_classes
    if not personal:
        set_lora_state(model, global_state)
        return evaluate(model, split.x, split.y, k)
    rows = []
    for cid in range(job.cfg.num_clients):
        set_lora_state(model, {**global_state, **personal.get(cid, {})})
        rows.append(evaluate(model, split.x, split.y, k))
    return {m: float(np.mean([r[m] for r in rows])) for m in rows[0]}


def _join_personal(global_state: LoRAState, personal: dict[int, LoRAState]) -> LoRAState:
    """The adapters a checkpoint stores: the global ones and each client's personal ones as
    "client<id>:<key>" (read back by _split_personal)."""
    return {**global_state, **{f"client{c}:{k}": t for c, st in personal.items() for k, t in st.items()}}


def _split_personal(state: LoRAState) -> tuple[LoRAState, dict[int, LoRAState]]:
    """A checkpoint's adapters into the global ones and each client's personal ones (_join_personal)."""
    glob, personal = {}, {}
    for k, t in state.items():
        head, sep, rest = k.partition(":")
        if sep and head.startswith("client") and head[6:].isdigit():
            personal.setdefault(int(head[6:]), {})[rest] = t
        else:
            glob[k] = t
    return glob, personal


def _progress(cfg: FedConfig, **kw):
    from tqdm.auto import tqdm
    kw.setdefault("leave", True)
    return tqdm(unit="round" if kw.get("leave") else "client", dynamic_ncols=True, disable=not cfg.progress, **kw)


def run(cfg: FedConfig, run_dir: str | None = None, log=print, **kw) -> dict:
    """Prepare the job once and run every method in cfg.methods (each in run_dir/<method>)."""
    if run_dir:
        os.makedirs(run_dir, exist_ok=True)
    if cfg.torch_threads:
        # the default model's matrices are tiny: thread hand-offs cost more than they save
        torch.set_num_threads(int(cfg.torch_threads))
    job = prepare_job(cfg, log=log, backbone_path=os.path.join(run_dir, "backbone.safetensors") if run_dir else None)
    for n in job.notes:
        log(f"[deer] {n}")
    results = {}
    for m in cfg.methods:
        spec = method_spec(m)
        results[spec.name] = run_method(job, spec.name, os.path.join(run_dir, spec.name) if run_dir else None,
                                        log=log, **kw)
    return {"job": job, "results": results}
