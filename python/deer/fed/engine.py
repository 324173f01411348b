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
nothing private: see skip_reason and docs/privacy.md section 7.1. Resume: the adapters, metrics and
round counter are saved atomically after every completed round; every privacy release is appended
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

from ..data import FedData, prepare_data
from .accounting import ReleaseJournal, noise_for_budget
from .aggregate import aggregate
from .client import ClientUpdate, LocalTrainConfig, local_steps, local_train
from .config import FedConfig, MethodSpec, method_spec
from .metrics import evaluate
from .model import (AdapterState, build_backbone, flatten_adapters, get_adapters, inject_lora, pretrain,
                    set_adapters, unflatten_adapters)

PHASE_CODE = {"A": 1, "B": 2, "AB": 3}
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
                            cfg.lam, cfg.local_steps, cfg.backend)


def train_client(job: "Job", cid: int, rnd: int, si: int, phase: str, spec: MethodSpec, sigma: float,
                 start: AdapterState, *, deadline: float | None = None, hook=None) -> ClientUpdate:
    """Client `cid`'s local training in sub-round `si` of round `rnd` with its keyed streams (the
    in-process engine and the Flower ClientApp both call this)."""
    cfg = job.cfg
    cd = job.data.clients[cid]
    return local_train(job.model, start, cd.x, cd.y, phase, spec, local_config(cfg, sigma),
                       generator(cfg.seed, "client", cid, rnd, si), deadline=deadline, hook=hook,
                       noise_seed=stream_seed(cfg.seed, "noise", cid, rnd, si), client=cid)


@dataclass
class ServerRelease:
    adapters: AdapterState
    ids: list[int]
    weights: list[float]
    noise_multiplier: float | None   # client level: the release's multiplier (charged at rate q)


def server_aggregate(cfg: FedConfig, spec: MethodSpec, sigma: float, global_state: AdapterState,
                     valid: dict[int, tuple[AdapterState, float]], rnd: int, si: int, phase: str) -> ServerRelease:
    """Aggregate the valid updates {client: (adapters, num_examples)} of one sub-round. Client level:
    clipped sum + noise over the expected number of participants q N (see aggregate.py)."""
    ids = sorted(valid)
    client = cfg.privacy == "client"
    weights = [1.0] * len(ids) if (cfg.weighting == "uniform" or client) else [float(valid[c][1]) for c in ids]
    agg = aggregate(global_state, [valid[c][0] for c in ids], weights, phase, spec, privacy=cfg.privacy,
                    noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm, lam=cfg.lam,
                    generator=generator(cfg.seed, "server", rnd, si),
                    denominator=client_rate(cfg) * cfg.num_clients if client else None)
    return ServerRelease(agg.adapters, ids, weights, agg.noise_multiplier)


@dataclass
class Job:
    """Everything shared by the methods of one run: the data split and the backbone with its
    initial (seeded) LoRA adapters."""
    cfg: FedConfig
    data: FedData
    model: nn.Module
    init_adapters: AdapterState
    notes: list[str] = field(default_factory=list)


def prepare_job(cfg: FedConfig, log=print, backbone_path: str | None = None) -> Job:
    """Split the data, build the backbone and inject LoRA. The backbone is loaded from
    `backbone_path` when that file exists (resume, Flower clients), else from cfg.checkpoint, else
    pretrained non-privately on the public split (and saved to backbone_path when given)."""
    data = prepare_data(cfg.dataset, num_clients=cfg.num_clients, partition=cfg.partition, alpha=cfg.alpha,
                        seed=cfg.seed, image_size=cfg.image_size, mode=cfg.image_mode,
                        public_fraction=0.0 if cfg.checkpoint else cfg.public_fraction,
                        public_classes=cfg.public_classes, test_fraction=cfg.test_fraction)
    notes = []
    model = build_backbone(cfg.model, data.num_classes, data.test.in_chans, cfg.model_kwargs,
                           cfg.checkpoint, log=log)
    if backbone_path and os.path.exists(backbone_path):
        from safetensors.torch import load_file
        model.load_state_dict(load_file(backbone_path))
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
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, backbone_path)
    inject_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, stream_seed(cfg.seed, "init"))
    return Job(cfg, data, model, get_adapters(model), notes)


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


def _finite(state: AdapterState) -> bool:
    return all(torch.isfinite(t).all() for d in state.values() for t in d.values())


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


ClientHook = Callable[[int, int, str, int, nn.Module], None]   # (client, round, phase, step, model)
AggregateHook = Callable[[dict], None]


def run_method(job: Job, method: str, run_dir: str | None = None, *, log=print,
               client_hook: ClientHook | None = None, on_aggregate: AggregateHook | None = None) -> dict:
    """Run (or resume) one method; returns {"method", "label", "history", "epsilon", ...}.

    on_aggregate(info) is called after every aggregation with the round, phase, the global adapters
    before and after, the valid clients' adapters and their weights (the deviation test uses it)."""
    cfg, data, model = job.cfg, job.data, job.model
    spec = method_spec(method)
    sigma, how = calibrate_noise(cfg, spec, data)
    state_path = journal_path = None
    if run_dir:
        os.makedirs(run_dir, exist_ok=True)
        state_path = os.path.join(run_dir, "state.pt")
        journal_path = os.path.join(run_dir, "releases.jsonl")
    journal = ReleaseJournal(journal_path)
    global_state = {n: {f: t.clone() for f, t in d.items()} for n, d in job.init_adapters.items()}
    history, skipped, start = [], [], 0
    if state_path and os.path.exists(state_path):
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        if st["fingerprint"] != cfg.fingerprint() or st["method"] != spec.name:
            raise ValueError(f"{run_dir} holds a run of {st['method']} with a different configuration: "
                             "use a new run directory, or the original configuration to resume")
        global_state, history, skipped = st["adapters"], st["history"], st["skipped"]
        start = st["round"] + 1
        log(f"[{spec.label}] resuming after round {start} of {cfg.rounds}; privacy journal has "
            f"{len(journal.entries)} releases (epsilon so far {journal.epsilon(cfg.delta):.3f})")
    elif journal.entries:
        log(f"[{spec.label}] killed before its first round completed; restarting at round 1, keeping "
            f"{len(journal.entries)} releases in the privacy journal")
    if start == 0 and not history:
        log(f"[{spec.label}] phases per round {list(spec.phases)}, metric {spec.metric}, noise {spec.noise}, "
            f"privacy {cfg.privacy}" + (f", noise multiplier {sigma:.4g} ({how}), C={cfg.max_grad_norm}, "
                                         f"lambda={cfg.lam}, delta={cfg.delta}" if cfg.privacy != "none" else ""))
    set_adapters(model, job.init_adapters)  # B = 0: the pretrained backbone's own predictions
    initial = evaluate(model, data.test.x, data.test.y, data.num_classes)
    if start == 0 and not history:
        log(f"[{spec.label}] before fine-tuning: acc {initial['accuracy']:.3f}  F1 {initial['f1']:.3f}  "
            f"AUC {initial['auc']:.3f}")
    bar = _progress(cfg, total=cfg.rounds, initial=start, desc=spec.label)
    for rnd in range(start, cfg.rounds):
        t0 = time.time()
        for si, phase in enumerate(spec.phases):
            sampled = sample_clients(cfg, rnd, si)
            updates: dict[int, ClientUpdate] = {}
            received = 0
            cbar = _progress(cfg, total=len(sampled), desc=f"  round {rnd + 1} {phase}", leave=False)
            for cid in sampled:
                hook = (lambda step, m, _c=cid, _p=phase: client_hook(_c, rnd, _p, step, m)) if client_hook else None
                deadline = time.monotonic() + cfg.client_timeout_s if cfg.client_timeout_s else None
                try:
                    upd = train_client(job, cid, rnd, si, phase, spec, sigma, global_state, deadline=deadline,
                                       hook=hook)
                except Exception as e:  # noqa: BLE001  a failing client must not end the run
                    log(f"[{spec.label}] round {rnd + 1} {phase}: client {cid} left out: {type(e).__name__}: {e}")
                    cbar.update()
                    continue
                finally:
                    set_adapters(model, global_state)
                received += 1
                if cfg.privacy == "sample":
                    for s, q, k in upd.releases:  # the client's update left the client: account it
                        journal.record(f"client{cid}", rnd, phase, s, q, k)
                if not _finite(upd.adapters):
                    log(f"[{spec.label}] round {rnd + 1} {phase}: client {cid} left out: non-finite (NaN/Inf) adapters")
                else:
                    updates[cid] = upd
                cbar.update()
            cbar.close()
            why = skip_reason(cfg, len(updates), received, available=cfg.num_clients)
            if why:
                log(f"[{spec.label}] round {rnd + 1} {phase}: skipped, {why}; global adapters unchanged, "
                    f"nothing released")
                skipped.append({"round": rnd, "phase": phase, "valid": len(updates)})
                continue
            rel = server_aggregate(cfg, spec, sigma, global_state,
                                   {c: (u.adapters, u.num_examples) for c, u in updates.items()}, rnd, si, phase)
            if cfg.privacy == "client":
                journal.record("server", rnd, phase, rel.noise_multiplier, client_rate(cfg), 1)
            if on_aggregate:
                on_aggregate({"round": rnd, "phase": phase, "before": global_state, "after": rel.adapters,
                              "clients": [updates[c].adapters for c in rel.ids], "weights": rel.weights,
                              "ids": rel.ids, "sampled": sampled})
            global_state = rel.adapters
        set_adapters(model, global_state)
        row = {"round": rnd + 1, **evaluate(model, data.test.x, data.test.y, data.num_classes),
               "epsilon": journal.epsilon(cfg.delta) if cfg.privacy != "none" else 0.0,
               "seconds": time.time() - t0}
        history.append(row)
        log(f"[{spec.label}] round {rnd + 1}/{cfg.rounds}: acc {row['accuracy']:.3f}  F1 {row['f1']:.3f}  "
            f"AUC {row['auc']:.3f}  eps {row['epsilon']:.3f}  ({row['seconds']:.1f}s)")
        if state_path:
            _atomic_save({"round": rnd, "adapters": global_state, "history": history, "skipped": skipped,
                          "fingerprint": cfg.fingerprint(), "method": spec.name}, state_path)
        bar.update()
    bar.close()
    eps = journal.epsilon(cfg.delta) if cfg.privacy != "none" else 0.0
    result = {"method": spec.name, "label": spec.label, "privacy": cfg.privacy, "noise_multiplier": sigma,
              "noise_calibration": how, "delta": cfg.delta, "epsilon": eps, "history": history,
              "skipped": skipped, "releases": len(journal.entries), "initial": initial,
              "final": history[-1] if history else {}}
    if run_dir:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in flatten_adapters(global_state).items()},
                  os.path.join(run_dir, "adapter.safetensors"))
        with open(os.path.join(run_dir, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1, default=float)
    result["adapters"] = global_state
    return result


def load_adapters(path: str) -> AdapterState:
    from safetensors.torch import load_file
    return unflatten_adapters(load_file(path))


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(cfg: FedConfig, **kw):
    if not cfg.progress:
        return _NoBar()
    from tqdm.auto import tqdm
    kw.setdefault("leave", True)
    return tqdm(unit="round" if kw.get("leave") else "client", dynamic_ncols=True, **kw)


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
