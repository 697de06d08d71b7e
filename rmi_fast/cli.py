"""`rmi-fast` command line: argument parsing only; every command calls into the library."""
from __future__ import annotations

import argparse
import platform
import sys


# ------------------------------------------------------------------------------------------------------------ info

def _info(args: argparse.Namespace) -> int:
    import torch

    import rmi_fast
    from rmi_fast import backends

    print(f"rmi_fast {rmi_fast.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}")
    try:
        from rmi_fast import _C

        print(f"compiled module: {_C.__file__} (CUDA kernels built: {bool(_C.with_cuda)})")
    except ImportError as exc:
        print(f"compiled module: not available ({exc})")
    print("backends:")
    for name, reason in backends.status().items():
        print(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="version, build and every backend with its status")
    p.set_defaults(func=_info)


# ----------------------------------------------------------------------------------------------------------- bench

def _add_bench(sub) -> None:
    pass


# ---------------------------------------------------------------------------------------- the paper's system

def _add_paper(sub) -> None:
    pass


# ------------------------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmi-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_info(sub)
    _add_bench(sub)
    _add_paper(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
