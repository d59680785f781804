"""A shorter credentialTTL, in both credential formats: a credential stays good until the
earlier of its own expiry and its issue time plus the binding's new TTL.

A Phorge-shaped credential carries no issue time: the gateway takes the start of its lease's
term that ends when the credential does (the lease's ``renewedAt`` as the operator wrote it
with that ``expiresAt``; earlier terms as its lease watch saw them), or the lease's
``issuedAt``. The gateway here runs on a clock that the test can move forward, so the end
of that time is seen without waiting for it.
"""

from __future__ import annotations

import datetime
import time

import pytest

from phabmesh import resources
from phabmesh.dev.conduit import ConduitServer
from phabmesh.processes.gateway import GatewayProcess
from tests.kube import Cluster, wait_for
from tests.phab import (
    G,
    V,
    active_leases,
    bind,
    exchange,
    make_pod,
    pod_token,
    settings_for,
    time_of,
    whoami,
)
from tests.stack import Threaded

OUTLIVED = "credential outlived the binding's credentialTTL"


@pytest.mark.parametrize("credential_format", ["phorge-token", "jwt"])
def test_a_young_credential_keeps_its_time_when_the_ttl_shrinks(
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    namespace: str,
    credential_format: str,
) -> None:
    ahead = [datetime.timedelta(0)]

    def clock() -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + ahead[0]

    settings = settings_for(conduit)
    own = Threaded(GatewayProcess(settings, kubeconfig=str(cluster.kubeconfig), clock=clock))
    own.start()
    try:
        bot = bind(cluster, conduit, namespace, credentialTTL="2m")
        pod = make_pod(cluster, namespace, "runner-1")
        lease = wait_for(lambda: active_leases(cluster, namespace))[0]
        issued = exchange(operator, pod_token(cluster, namespace, pod), format=credential_format)
        assert issued.status_code == 200, issued.text
        made = datetime.datetime.now(datetime.UTC)  # it was made before this
        credential = issued.json()["credential"]
        assert issued.json()["format"] == credential_format
        wait_for(
            lambda: (
                (answer := whoami(own, credential)).get("result")
                and answer["result"]["userName"] == bot
            ),
            what="the gateway to answer as the bot",
        )
        time.sleep(6)  # the credential is a few seconds old when the TTL shrinks

        cluster.custom.patch_namespaced_custom_object(
            G,
            V,
            namespace,
            resources.BINDING_PLURAL,
            "runners",
            {"spec": {"credentialTTL": "1m"}},
        )
        index = own.process.state.leases  # type: ignore[attr-defined]
        uid = lease["metadata"]["uid"]

        def shortened() -> tuple[datetime.datetime, datetime.datetime] | None:
            """(renewedAt, expiresAt) of the lease once the operator has shortened it."""
            for item in active_leases(cluster, namespace):
                status = item["status"]
                start, end = time_of(status["renewedAt"]), time_of(status["expiresAt"])
                if item["metadata"]["uid"] == uid and end - start <= datetime.timedelta(minutes=1):
                    return start, end
            return None

        term = wait_for(shortened, what="the operator to shorten the lease")
        assert term is not None
        shrunk_at, lease_end = term
        wait_for(
            lambda: (seen := index.by_uid.get(uid)) is not None and seen.expires_at == lease_end,
            what="the gateway to see the lease shortened",
        )
        assert time_of(issued.json()["expiresAt"]) > shrunk_at + datetime.timedelta(minutes=1)

        # Young: still good, though it ends after its lease now does.
        answer = whoami(own, credential)
        assert answer.get("error_code") is None, answer
        assert answer["result"]["userName"] == bot

        # Past its issue time plus the new TTL (and the 30 s skew), before its own expiry and
        # within the shortened lease's end (plus skew): refused.
        skew = datetime.timedelta(seconds=settings.clock_skew)
        at = shrunk_at + datetime.timedelta(minutes=1) + skew - datetime.timedelta(seconds=2)
        assert at > made + datetime.timedelta(minutes=1) + skew
        ahead[0] = at - datetime.datetime.now(datetime.UTC)
        answer = whoami(own, credential)
        assert answer.get("error_code") == "ERR-INVALID-AUTH", answer
        assert OUTLIVED in str(answer["error_info"])
    finally:
        own.stop()
