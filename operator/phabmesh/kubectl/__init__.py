"""``kubectl phabmesh``: the questions a cluster admin asks of phabmesh, answered from the
cluster.

- ``check``: is the install healthy (CRDs, webhook and caBundle, peering, RBAC, Linkerd
  policy, signing keys, Phabricator)?
- ``why POD``: the one reason a pod holds a credential or holds none, from the operator's own
  pure decisions (:func:`phabmesh.leases.explain.explain_pod`) over the objects read now;
- ``who-can BOT``: which pods and identities hold a credential for a bot now;
- ``revoke pod/NAME|binding/NAME``: revoke credentials now, with an Event and an audit line;
- ``recheck BOT``: ask the operator to check a bot against Phabricator now.

Installed as the executable ``kubectl-phabmesh`` (kubectl finds plugins on PATH by that
name); ``python -m phabmesh.kubectl`` is the same command. It runs as the caller's kubeconfig
user and talks to the API server (and, for ``check``, to Phabricator) only.
"""
