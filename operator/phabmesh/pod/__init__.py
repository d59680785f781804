"""The pod side: what runs inside workload pods.

The pod's client of the credential endpoint (``client``: exchange the projected
service-account token for a credential, ``phabmesh credential``) and the credential agent
that the webhook adds (``agent``: ``phabmesh agent sidecar|init``, which writes the
credential and an ``.arcrc`` for the app containers).
"""
