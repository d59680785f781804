"""The ``phabmesh`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from phabmesh import __version__, logs
from phabmesh.backoff import Backoff
from phabmesh.pod import client as podclient
from phabmesh.pod.client import DEFAULT_TOKEN_FILE as _TOKEN_FILE
from phabmesh.settings import Settings, retry_policy, warn_deprecated

# Renamed commands still run: old name → the command it runs now (a line on stderr and a
# ``command_deprecated`` log line say so).
DEPRECATED_COMMANDS = {"controller": "operator"}


def _dev_kits_missing(command: str) -> int | None:
    """2 and a message when this install has no development kits (an installed wheel)."""
    try:
        import phabmesh.dev  # noqa: F401 - only whether it is there
    except ImportError:
        print(
            f"phabmesh {command}: this needs a phabmesh checkout (its development kits and "
            "the Go modules of the local control plane are not in the installed package); "
            "run `make run` or `make dev-cluster` there",
            file=sys.stderr,
        )
        return 2
    return None


def _dev_cluster(args: argparse.Namespace) -> int:
    if (missing := _dev_kits_missing("dev-cluster")) is not None:
        return missing
    from phabmesh.dev import devcluster

    crds = Path(args.crds) if args.crds else None
    try:
        delays = devcluster.Delays.parse(args.delays)
    except ValueError as exc:
        print(f"phabmesh dev-cluster: {exc}", file=sys.stderr)
        return 2
    try:
        devcluster.serve_forever(
            Path(args.data_dir) if args.data_dir else None, crds, delays, args.real_node
        )
    except devcluster.ControlPlaneError as exc:
        if not args.real_node:
            raise
        print(f"phabmesh dev-cluster: {exc}", file=sys.stderr)
        return 1
    return 0


def _dev_conduit(args: argparse.Namespace) -> int:
    if (missing := _dev_kits_missing("dev-conduit")) is not None:
        return missing
    import asyncio

    from phabmesh.dev.conduit import standalone
    from phabmesh.dev.quickstart import until_signalled

    bots = args.bot or ["ci-bot"]
    asyncio.run(standalone.serve(args.port, bots, args.namespace, until=until_signalled))
    return 0


def _settings(command: str) -> Settings:
    """This process's settings, logging configured by them, each deprecated variable set
    logged once; exit 2 with one line naming the variable for a value it cannot use."""
    try:
        settings = Settings.from_env()
    except (ValueError, TypeError) as exc:
        print(f"phabmesh {command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.configure(settings.log_level, settings.log_json)
    warn_deprecated()
    if command in DEPRECATED_COMMANDS:
        structlog.get_logger("phabmesh.cli").warning(
            "command_deprecated", old=command, new=DEPRECATED_COMMANDS[command]
        )
    return settings


def _no_cluster(command: str, exc: Exception) -> int:
    """2 and one line when there is no cluster to connect to (the image run outside one)."""
    print(
        f"phabmesh {command}: no cluster to connect to ({exc}); give --kubeconfig, set "
        "KUBECONFIG, or run it in a pod with its service account",
        file=sys.stderr,
    )
    return 2


def _operator(args: argparse.Namespace, command: str = "operator") -> int:
    import asyncio

    from kubernetes.config import ConfigException

    from phabmesh.processes.operator import OperatorProcess

    settings = _settings(command)
    process = OperatorProcess(settings, kubeconfig=args.kubeconfig, standalone=not args.peering)
    try:
        asyncio.run(process.run_until_signalled())
    except ConfigException as exc:
        return _no_cluster(command, exc)
    return 0


def _controller(args: argparse.Namespace) -> int:
    """``phabmesh controller``, the operator's former command: one line on stderr and a
    ``command_deprecated`` log line, then the operator as ``phabmesh operator`` runs it."""
    print(
        "phabmesh controller: deprecated, use `phabmesh operator` (same flags)",
        file=sys.stderr,
        flush=True,
    )
    return _operator(args, command="controller")


def _webhook(args: argparse.Namespace) -> int:
    import asyncio

    from kubernetes.config import ConfigException

    from phabmesh.admission.server import WebhookProcess

    settings = _settings("webhook")
    try:
        asyncio.run(WebhookProcess(settings, kubeconfig=args.kubeconfig).run_until_told())
    except ConfigException as exc:
        return _no_cluster("webhook", exc)
    except ValueError as exc:  # a setting it cannot use: the message names it
        print(f"phabmesh webhook: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> int:
    if (missing := _dev_kits_missing("run")) is not None:
        return missing
    from phabmesh.dev import quickstart

    logs.configure(os.environ.get("PHABMESH_LOG_LEVEL", "WARNING"))
    return quickstart.run(wait=not args.no_wait, require_client_id=args.require_client_id)


def _gateway(args: argparse.Namespace) -> int:
    import asyncio

    from kubernetes.config import ConfigException

    settings = _settings("gateway")
    try:
        if settings.gateway_workers > 1:  # the parent: none of the gateway's own modules
            from phabmesh.kube import load_connection
            from phabmesh.processes.gateway_workers import GatewayWorkers

            load_connection(args.kubeconfig)  # no cluster: said here, not by each worker
            asyncio.run(GatewayWorkers(settings, kubeconfig=args.kubeconfig).run_until_signalled())
        else:
            from phabmesh.processes.gateway import GatewayProcess

            asyncio.run(GatewayProcess(settings, kubeconfig=args.kubeconfig).run_until_signalled())
    except ConfigException as exc:
        return _no_cluster("gateway", exc)
    return 0


def _fetcher(args: argparse.Namespace) -> Callable[[], podclient.Credential]:
    """The exchange ``phabmesh credential`` and ``phabmesh agent`` make, as their flags say."""
    variable = "PHABMESH_CREDENTIAL_ENDPOINT"
    if args.endpoint:
        endpoint, source = args.endpoint, "from --endpoint"
    elif os.environ.get(variable):
        endpoint, source = os.environ[variable], f"from {variable}"
    else:
        endpoint, source = podclient.DEFAULT_ENDPOINT, f"the default: {variable} is not set"
    token_file = Path(args.token_file)

    def fetch() -> podclient.Credential:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise podclient.ExchangeError(f"cannot read {token_file}: {exc.strerror}") from exc
        return podclient.exchange(
            endpoint, token, binding=args.binding, credential_format=args.format, source=source
        )

    return fetch


def _pod_retry_policy(command: str) -> Backoff:
    """The pod side's retry policy, from its environment; exit 2 with one line naming the
    variable for a value it cannot use."""
    try:
        return retry_policy()
    except (ValueError, TypeError) as exc:
        print(f"phabmesh {command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _credential(args: argparse.Namespace) -> int:
    logs.configure("INFO")
    policy = _pod_retry_policy("credential")
    fetch = _fetcher(args)

    def store(credential: podclient.Credential) -> None:
        if args.output:
            podclient.write_atomically(Path(args.output), credential.token + "\n")
        if args.print:
            print(credential.token, flush=True)

    if args.watch:
        podclient.watch(fetch, store, policy=policy)
        return 0
    try:
        store(fetch())
    except podclient.ExchangeError as exc:
        print(f"phabmesh credential: {exc}", file=sys.stderr)
        return 1
    return 0


def _agent(args: argparse.Namespace) -> int:
    from phabmesh.pod import agent

    logs.configure(os.environ.get("PHABMESH_LOG_LEVEL", "INFO"))
    policy = _pod_retry_policy("agent")
    fetch = _fetcher(args)
    store = agent.Writer(Path(args.dir), args.gateway or "")
    if args.mode == "init":
        return agent.run_init(
            fetch,
            store,
            timeout=args.timeout,
            termination_log=Path(args.termination_log),
            policy=policy,
        )
    return agent.run_sidecar(fetch, store, policy)


def _exchange_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint", help="credential endpoint URL (env PHABMESH_CREDENTIAL_ENDPOINT)"
    )
    parser.add_argument("--token-file", default=os.environ.get("PHABMESH_TOKEN_FILE", _TOKEN_FILE))
    parser.add_argument("--binding", help="which binding, when several grant this pod a credential")
    parser.add_argument(
        "--format",
        choices=podclient.FORMATS,
        help="phorge-token (api- and 28 characters, as Conduit clients expect) or jwt "
        "(default: the binding's credentialFormat, itself PhorgeToken by default)",
    )


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
    dev.add_argument(
        "--delays",
        default="none",
        help="how long simulated pods take (KWOK): none (default, immediate), realistic, "
        "or start=MS,complete=MS,stop=MS,jitter=MS",
    )
    dev.add_argument(
        "--real-node",
        action="store_true",
        help="also run a real node (kubelet, kube-proxy, containerd) whose pods really run; "
        "needs root and `make node-packages`",
    )
    dev.set_defaults(func=_dev_cluster)

    phorge = sub.add_parser(
        "dev-conduit",
        help="run the Conduit test server standing in for Phabricator (beside dev-cluster)",
    )
    phorge.add_argument("--port", type=int, default=8081, help="port on 127.0.0.1 (8081)")
    phorge.add_argument(
        "--bot", action="append", help="a bot account to create (repeatable; default ci-bot)"
    )
    phorge.add_argument(
        "--namespace",
        default="phabmesh-system",
        help="where each bot's token Secret <bot>-token goes (phabmesh-system)",
    )
    phorge.set_defaults(func=_dev_conduit)

    for name, func, what in (
        ("operator", _operator, "run the operator: the controller and the credential endpoint"),
        ("controller", _controller, "deprecated name of `operator`"),
    ):
        ctl = sub.add_parser(name, help=what)
        ctl.add_argument("--kubeconfig", help="default: $KUBECONFIG, ~/.kube/config or in-cluster")
        ctl.add_argument(
            "--peering",
            action="store_true",
            help="coordinate with other replicas (kopf peering) so that only one acts",
        )
        ctl.set_defaults(func=func)

    hook = sub.add_parser(
        "webhook",
        help="serve the pod-injection webhook (the operator starts it: no need to run it)",
    )
    hook.add_argument("--kubeconfig", help="default: $KUBECONFIG, ~/.kube/config or in-cluster")
    hook.set_defaults(func=_webhook)

    run = sub.add_parser(
        "run",
        help="run phabmesh: against the current cluster, or the quick start on a local one",
    )
    run.add_argument("--no-wait", action="store_true", help="exit when the quick start is done")
    run.add_argument(
        "--require-client-id",
        action="store_true",
        help="the quick start with PHABMESH_REQUIRE_CLIENT_ID on, as the chart ships it: "
        "l5d-client-id sent as Linkerd's proxy would",
    )
    run.set_defaults(func=_run)

    gw = sub.add_parser("gateway", help="run the Conduit gateway")
    gw.add_argument("--kubeconfig", help="default: $KUBECONFIG, ~/.kube/config or in-cluster")
    gw.set_defaults(func=_gateway)

    cred = sub.add_parser(
        "credential", help="(in a pod) exchange the service-account token for a credential"
    )
    _exchange_flags(cred)
    cred.add_argument("--output", "-o", help="write the credential to this file (mode 0600)")
    cred.add_argument("--print", action="store_true", help="print the credential on stdout")
    cred.add_argument("--watch", action="store_true", help="keep refreshing it before expiry")
    cred.set_defaults(func=_credential)

    agt = sub.add_parser(
        "agent",
        help="(in a pod) the credential agent: write the credential and an ~/.arcrc "
        "for the gateway, once (init) or kept fresh (sidecar)",
    )
    agt.add_argument("mode", choices=("sidecar", "init"))
    agt.add_argument("--dir", default="/var/run/phabmesh", help="where to write the files")
    agt.add_argument(
        "--gateway",
        default=os.environ.get("PHABMESH_GATEWAY_URL", ""),
        help="the gateway's URL for the .arcrc (env PHABMESH_GATEWAY_URL)",
    )
    agt.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="init: give up after this many seconds of failed exchanges (default 120)",
    )
    agt.add_argument(
        "--termination-log",
        default="/dev/termination-log",
        help="init: where a failure's reason is written (the container's termination message)",
    )
    _exchange_flags(agt)
    agt.set_defaults(func=_agent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is _credential and not (args.output or args.print):
        parser.error("credential: give --output FILE and/or --print")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
