"""Development kits: the local control plane, the quick start, the Conduit test server and
the CRD schema check.

They serve a checkout of phabmesh (the tests, ``make run``, ``make dev-cluster``, ``make
manifests``, the benchmark) and are not part of the wheel: the control plane is built
from the Go modules under ``tests/controlplane``, which only a checkout has, and the test
server hands out Phorge-shaped tokens that no production image should carry.
"""
