"""The ``phabmesh`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from phabmesh import __version__


def _dev_cluster(args: argparse.Namespace) -> int:
    from phabmesh import devcluster

    crds = Path(args.crds) if args.crds else None
    devcluster.serve_forever(Path(args.data_dir) if args.data_dir else None, crds)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phabmesh",
        description="Linkerd workload identities to short-lived Phabricator bot credentials.",
    )
    parser.add_argument("--version", action="version", version=f"phabmesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser(
        "dev-cluster",
        help="run a local Kubernetes control plane in the foreground (Ctrl-C stops it)",
    )
    dev.add_argument("--data-dir", help="keep its files here (default: a fresh temporary dir)")
    dev.add_argument("--crds", help="apply the CRDs in this directory once it is ready")
    dev.set_defaults(func=_dev_cluster)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
