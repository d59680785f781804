"""Leases: the stage between matching and credentials.

A lease (a PhabricatorCredential object) says that one pod incarnation may act as one bot
through one binding until it expires or is revoked. Here: the lease as the processes read
it (``view``), the shared watch of every lease (``index``), the grants a lease must still
have from its binding, bot and namespace (``grants``), and the pods that have ended
(``podends``), which the gateway and the endpoint refuse before the operator has written
the revocation.
"""
