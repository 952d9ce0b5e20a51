"""The `reco` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _info(_args: argparse.Namespace) -> int:
    import torch

    import reco
    from reco import ops

    info = {
        "reco": reco.__version__,
        "torch": torch.__version__,
        "compiled_core": ops._C is not None,
    }
    if ops._C is not None:
        info["cpu_levels"] = ops._C.cpu_levels()
        info["default_cpu_level"] = ops._C.default_cpu_level()
        info["with_cuda"] = bool(ops._C.with_cuda)
    print(json.dumps(info, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reco", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and the compiled kernels available here").set_defaults(
        func=_info
    )
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
