"""deer command line."""
from __future__ import annotations

import argparse
import sys


def main(argv=None):
    p = argparse.ArgumentParser(prog="deer", description="Differentially private (federated) LoRA fine-tuning")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the embedded default job (CPU, a few minutes)")
    d.add_argument("--seed", type=int, default=0)
    sub.add_parser("info", help="print versions and the backends available here")
    args = p.parse_args(argv)
    if args.cmd == "demo":
        from .quickstart import run
        run(seed=args.seed)
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
