"""Who vouches for ``l5d-client-id`` at the credential endpoint: the serving pod's own Linkerd
proxy, which connects from inside the pod (its own address, or a loopback one). The
connection's two addresses are the only input, so they are given here by hand; the
endpoint and the gateway with the setting on, over real sockets, are in
tests/integration/test_meshed.py."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from phabmesh import serving
from phabmesh.endpoint import app as endpoint_app

ME = "runner.ci.serviceaccount.identity.linkerd.cluster.local"


def _request(peer: str, local: str, headers: dict[str, str]) -> web.Request:
    transport = mock.Mock()
    addresses = {"peername": (peer, 40000), "sockname": (local, 8443)}
    transport.get_extra_info.side_effect = lambda key, default=None: addresses.get(key, default)
    return make_mocked_request("POST", "/v1/credentials", headers=headers, transport=transport)


def _refusal(response: web.Response | None) -> dict[str, str] | None:
    if response is None:
        return None
    assert response.status == 403
    assert response.text is not None
    body: dict[str, str] = json.loads(response.text)
    assert body["error"] == "no_client_id"
    assert "PHABMESH_REQUIRE_CLIENT_ID" in body["message"]
    assert "linkerd.io/inject: enabled" in body["message"]
    return body


@pytest.mark.parametrize(
    ("peer", "local"),
    [("10.1.2.3", "10.1.2.3"), ("127.0.0.1", "10.1.2.3"), ("::ffff:10.1.2.3", "10.1.2.3")],
)
def test_the_pods_own_proxy_vouches(peer: str, local: str) -> None:
    request = _request(peer, local, {"l5d-client-id": ME})
    assert serving.local_address(request) == local
    assert endpoint_app._unvouched(request) is None


def test_a_header_from_another_pod_is_not_linkerds_word() -> None:
    """A caller that reached the port past the proxy (another address) wrote it itself."""
    body = _refusal(
        endpoint_app._unvouched(_request("10.1.2.4", "10.1.2.3", {"l5d-client-id": ME}))
    )
    assert body is not None
    assert "came from 10.1.2.4, not from this pod's Linkerd proxy" in body["message"]


def test_no_header_is_no_mtls() -> None:
    body = _refusal(endpoint_app._unvouched(_request("10.1.2.3", "10.1.2.3", {})))
    assert body is not None
    assert "carried no l5d-client-id" in body["message"]
