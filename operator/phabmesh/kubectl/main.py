"""``kubectl phabmesh``'s command line: arguments, exit codes, output.

Exit codes, as kubectl's: 0 answered (``check``: nothing FAILed), 1 a failure (an object not
found, the API server refusing, a ``check`` that FAILed, a revocation that did not land), 2 a
usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from phabmesh import __version__, logs
from phabmesh.clock import utcnow
from phabmesh.kube import KubeError
from phabmesh.kubectl import checks, cluster, commands, output, precheck

PROG = "kubectl phabmesh"


def _common() -> argparse.ArgumentParser:
    """kubectl's own options, accepted before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    common.add_argument("--kubeconfig", default=s, help="path to the kubeconfig file")
    common.add_argument("--context", default=s, help="the kubeconfig context to use")
    common.add_argument(
        "-n", "--namespace", default=s, help="the namespace (default: the context's)"
    )
    common.add_argument(
        "-o", "--output", choices=output.FORMATS, default=s, help="table (default), json or yaml"
    )
    common.add_argument(
        "--phabmesh-namespace",
        default=s,
        help=f"where phabmesh is installed (default {cluster.SYSTEM})",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Ask phabmesh why a pod has (no) credential, who can act as a bot, "
        "whether the install is healthy; revoke credentials; re-check a bot.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser(
        "check",
        parents=[common],
        help="check the install: CRDs, webhook, peering, RBAC, Linkerd policy, keys, "
        "Phabricator, PhabricatorWebhooks",
    )
    check.add_argument(
        "--pre",
        action="store_true",
        help="before installing: Kubernetes version, Linkerd's CRDs, what is there already, "
        "and whether you may create what the install creates",
    )
    why = sub.add_parser(
        "why", parents=[common], help="the one reason a pod holds a credential, or holds none"
    )
    why.add_argument("pod", metavar="POD")
    who = sub.add_parser(
        "who-can",
        parents=[common],
        help="pods and identities holding a credential for a bot now, and webhooks acting as it",
    )
    who.add_argument("bot", metavar="BOT")
    revoke = sub.add_parser(
        "revoke",
        parents=[common],
        help="revoke the credentials of a pod or of a binding now",
        description="Revoke now the Active credentials of a pod (pod/NAME) or of every pod of "
        "a binding (binding/NAME). Each revoked pod gets no new credential through that "
        "binding while it lives; a new pod does.",
    )
    revoke.add_argument("target", nargs="+", metavar="pod/NAME|binding/NAME")
    revoke.add_argument(
        "--dry-run",
        nargs="?",
        const="client",
        choices=commands.DRY_RUNS,
        help="client: list what would be revoked, write nothing; server: send the "
        "revocations as a dry run, judged by RBAC and the lease policy, stored nowhere",
    )
    recheck = sub.add_parser(
        "recheck", parents=[common], help="ask the operator to check a bot against Phabricator now"
    )
    recheck.add_argument("bot", metavar="BOT")
    return parser


def options_of(args: argparse.Namespace) -> cluster.Options:
    return cluster.Options(
        kubeconfig=getattr(args, "kubeconfig", None),
        context=getattr(args, "context", None),
        namespace=getattr(args, "namespace", None),
        system=getattr(args, "phabmesh_namespace", None) or cluster.SYSTEM,
    )


async def _run(args: argparse.Namespace, target: tuple[str, str] | None) -> output.Report:
    options = options_of(args)
    now = utcnow()
    async with cluster.Session(options) as session:
        if args.command == "check" and args.pre:
            return checks.report(await precheck.run(session))
        if args.command == "check":
            return checks.report(await checks.run(session, now))
        namespace = cluster.default_namespace(options)
        if args.command == "why":
            return await commands.why(session, namespace, args.pod)
        if args.command == "who-can":
            return await commands.who_can(session, args.bot, now)
        if args.command == "revoke":
            assert target is not None
            return await commands.revoke(session, namespace, *target, now, args.dry_run)
        return await commands.recheck(session, args.bot, now)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    target = None
    if args.command == "revoke":
        try:
            target = commands.parse_target(args.target)
        except ValueError as exc:
            parser.error(str(exc))  # exit code 2
    # Audit lines (revoke) and warnings: JSON on stderr; stdout carries the answer only.
    logs.configure("INFO", json_output=True, stream=sys.stderr)
    try:
        report = asyncio.run(_run(args, target))
    except cluster.Missing as exc:
        print(f"Error from server (NotFound): {exc}", file=sys.stderr)
        return 1
    except KubeError as exc:
        print(f"Error from server: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a kubeconfig that does not load, an unreachable API server
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    out, err = output.render(report, getattr(args, "output", None) or "table")
    sys.stdout.write(out)
    sys.stderr.write(err)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
