"""deer command line.

    deer demo                              the embedded default: DEeR vs FFA-LoRA vs FedAvg-LoRA, one budget
    deer train --config job.yaml k=v ...   a federated run from a YAML config with key=value overrides
    deer train --resume runs/X             continue a killed run from its last completed round
    deer flower init --superlink H:P DIR   a Flower deployment: job, app, TLS certificates, site keys
    deer info                              versions and kernel backends
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time


def _log(msg: str) -> None:
    from tqdm.auto import tqdm
    tqdm.write(msg)


def _run(cfg, run_dir: str, title: str, started: float) -> int:
    import yaml

    from .fed import engine
    from .fed.report import print_table, save_report
    os.makedirs(run_dir, exist_ok=True)
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(cfg_path):  # atomically: a kill must never leave a torn config to resume from
        with open(cfg_path + ".tmp", "w") as f:
            yaml.safe_dump({**cfg.to_dict(), "run_dir": None}, f, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(cfg_path + ".tmp", cfg_path)
    _log(f"[deer] run directory {run_dir}")
    out = engine.run(cfg, run_dir, log=_log)
    print()
    print_table(out["results"], title)
    paths = save_report(out["results"], run_dir, title)
    print(f"[deer] wrote {paths['results']}, {paths['plot']}, and per method: metrics.json, adapter.safetensors, "
          f"releases.jsonl (privacy journal) under {run_dir}/<method>/ ; {time.time() - started:.0f}s in all")
    return _outcome(cfg, out["results"])


def _outcome(cfg, results: dict) -> int:
    """0 when every sub-round that sampled clients aggregated something; 1, and why, when a method
    trained nothing, or when every sampled client of some sub-round failed (no valid update)."""
    from .fed.config import method_spec
    status = 0
    for name, r in results.items():
        failed = [s for s in r["skipped"] if s["sampled"] > 0 and s["valid"] == 0]
        if len(r["skipped"]) >= cfg.rounds * len(method_spec(name).phases):
            print(f"deer: error: {r['label']} trained nothing: every sub-round was skipped (see the 'left out' and "
                  "'skipped' lines above for why); the adapters are the initial ones", file=sys.stderr)
            status = 1
        elif not math.isfinite(float(r["final"].get("accuracy", math.nan))):
            print(f"deer: error: {r['label']}: the final model's outputs are not finite (the adapters diverged; "
                  "lower lr or set update_norm_bound)", file=sys.stderr)
            status = 1
        elif failed:
            where = ", ".join(f"round {s['round'] + 1} {s['phase']}" for s in failed)
            print(f"deer: error: {r['label']}: every sampled client failed in {where} (see the 'left out' lines "
                  "above); the run finished without those sub-rounds", file=sys.stderr)
            status = 1
        elif r["skipped"]:
            print(f"[deer] warning: {r['label']}: {len(r['skipped'])} sub-rounds skipped (fewer valid client updates "
                  "than min_clients, or no client sampled)", file=sys.stderr)
    return status


def _new_run_dir(given: str | None, name: str) -> str:
    """The directory of a new run: `given`, which must not hold a run already, or runs/<name> (with a
    suffix if a run started in the same second took that name)."""
    if given:
        if os.path.exists(os.path.join(given, "config.yaml")):
            raise ValueError(f"{given} already holds a run: continue it with --resume {given}, or choose a new "
                             "--run-dir")
        return given
    os.makedirs("runs", exist_ok=True)
    path, n = os.path.join("runs", name), 1
    while True:
        try:
            os.mkdir(path)          # claims the name: two runs never share a directory
            return path
        except FileExistsError:
            n += 1
            path = os.path.join("runs", f"{name}-{n}")


def _resume_config(run_dir: str, args):
    """RUN_DIR's own config; overrides may change only keys that do not change results."""
    from .fed.config import RESULT_NEUTRAL, load_config
    given = [f"--{o}" for o in ("config", "data", "checkpoint") if getattr(args, o)]
    if given:
        raise ValueError(f"--resume continues {run_dir} with the configuration it started with "
                         f"({run_dir}/config.yaml); {', '.join(given)} would change it: drop them, or start a new "
                         "run directory")
    cfg_file = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(cfg_file):
        raise ValueError(f"{run_dir!r} is not a deer run directory (no config.yaml)")
    saved, cfg = load_config(cfg_file).to_dict(), load_config(cfg_file, args.overrides)
    changed = {k: (saved[k], v) for k, v in cfg.to_dict().items() if k not in RESULT_NEUTRAL and v != saved[k]}
    if changed:
        raise ValueError(f"--resume: {', '.join(f'{k}={new!r} (the run has {old!r})' for k, (old, new) in changed.items())}"
                         f"; a resumed run keeps the configuration its noise and privacy accounting were computed "
                         f"for. Only {', '.join(RESULT_NEUTRAL[1:])} may change; start a new run directory to "
                         "change anything else")
    return cfg


def _describe(cfg) -> str:
    from .data import DEFAULT_DATASET_NOTE
    lines = [f"[deer] data: {cfg.dataset}" + (f" -- {DEFAULT_DATASET_NOTE}" if cfg.dataset == "digits" else "")]
    if cfg.privacy == "sample":
        lines.append(f"[deer] privacy: sample level (record level), DP-SGD in every client, target epsilon "
                     f"{cfg.target_epsilon} at delta {cfg.delta} for the worst client; each method's noise "
                     "multiplier spends exactly that budget over its own releases")
    elif cfg.privacy == "client":
        lines.append(f"[deer] privacy: client level (user level), the server clips the whole update of each "
                     "client in a Poisson sample (rate clients_per_round / num_clients), adds noise to the clipped sum and "
                     f"divides by the expected count; target epsilon {cfg.target_epsilon} at delta {cfg.delta}")
    else:
        lines.append("[deer] privacy: none")
    if not cfg.checkpoint:
        lines.append(f"[deer] no hub access: the small {cfg.model} backbone is first pretrained NON-privately on a "
                     f"public split ({cfg.public_fraction:.0%} of the training data, classes "
                     f"{cfg.public_classes if cfg.public_classes is not None else 'all'}), then LoRA adapters "
                     "are fine-tuned privately on the clients' disjoint split")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="deer", description="Differentially private (federated) LoRA fine-tuning")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="DEeR vs FFA-LoRA vs FedAvg-LoRA on the bundled data (CPU, a few minutes)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--run-dir", default=None, help="where to write results (default runs/demo-<time>)")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("overrides", nargs="*", help="key=value overrides of the embedded config")
    t = sub.add_parser("train", help="a federated run from a YAML config")
    t.add_argument("--config", default=None, help="YAML file (default: the embedded deer/configs/default.yaml)")
    t.add_argument("--run-dir", default=None, help="run directory (default runs/train-<time>)")
    t.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last completed round (uses RUN_DIR/config.yaml)")
    t.add_argument("--checkpoint", default=None, help="backbone weights (safetensors or .pth)")
    t.add_argument("--data", default=None, help="data set: 'digits', an image folder or a MedMNIST .npz")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rounds=10 methods=[deer] lr=0.05")
    fl = sub.add_parser("flower", help="Flower deployments").add_subparsers(dest="flower_cmd", required=True)
    fi = fl.add_parser("init", help="write a complete Flower deployment (job, app, TLS certificates, site keys) "
                                    "into a new folder; docs/flower.md shows the commands that run it")
    fi.add_argument("folder")
    fi.add_argument("--superlink", required=True, metavar="HOST:PORT",
                    help="the address sites will reach the SuperLink at (its TLS certificate is issued for HOST)")
    fi.add_argument("--config", default=None, help="YAML file (default: the embedded deer/configs/default.yaml)")
    fi.add_argument("--method", default="deer", help="deer | deer_no_nr | deer_no_de | ffa | fedavg (fedsa runs in-process only)")
    fi.add_argument("--insecure", action="store_true",
                    help="no TLS and no SuperNode authentication (a test on one machine only)")
    fi.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    sub.add_parser("info", help="print versions and the backends available here")
    # key=value overrides may come before, between or after the options (argparse alone takes only the
    # first run of positionals)
    args, extra = p.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")

    if args.cmd in ("demo", "train"):
        from .fed.config import load_config
        try:
            if args.cmd == "demo":
                cfg = load_config(None, [f"seed={args.seed}", *args.overrides])
                run_dir = _new_run_dir(args.run_dir, f"demo-{stamp}")
                title = "deer demo"
            else:
                if args.resume:
                    cfg = _resume_config(args.resume, args)
                    run_dir = args.resume
                else:
                    ov = list(args.overrides)
                    if args.checkpoint:
                        ov.append(f"checkpoint={args.checkpoint}")
                    if args.data:
                        ov.append(f"dataset={args.data}")
                    cfg = load_config(args.config, ov)
                    run_dir = _new_run_dir(args.run_dir, f"train-{stamp}")
                title = f"deer train ({args.config or 'default config'})"
            if args.no_progress:
                cfg = cfg.replace(progress=False)
        except ValueError as e:
            print(f"deer: error: {e}", file=sys.stderr)
            return 2
        methods = ", ".join(cfg.methods)
        title += f": {methods}; privacy {cfg.privacy}" + (
            f", target eps {cfg.target_epsilon} (delta {cfg.delta})" if cfg.privacy != "none" else "")
        print(_describe(cfg))
        try:
            return _run(cfg, run_dir, title, started)
        except ValueError as e:
            print(f"deer: error: {e}", file=sys.stderr)
            return 2
    if args.cmd == "flower":
        from .fed.config import load_config
        from .fed.flower_app import init_deployment
        try:
            cfg = load_config(args.config, [*args.overrides, "progress=false"])
            paths = init_deployment(args.folder, cfg, args.superlink, args.method, args.insecure, log=_log)
        except ValueError as e:
            print(f"deer: error: {e}", file=sys.stderr)
            return 2
        print(f"[deer] wrote a Flower deployment of {cfg.num_clients} sites to {os.path.abspath(args.folder)}: "
              + ", ".join(f"{k}/" for k in paths if os.path.exists(paths[k]))
              + "; docs/flower.md, section 'Deployment', lists the commands that run it")
        return 0
    if args.cmd == "info":
        import torch
        from . import __version__, _ext
        from .ops import available_backends
        print(f"deer {__version__}, torch {torch.__version__}")
        print(f"compiled backends: {_ext.compiled_backends()}; usable on CPU tensors: {available_backends('cpu')}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
