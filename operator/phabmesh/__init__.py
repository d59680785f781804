"""phabmesh: Linkerd workload identities to short-lived Phabricator bot credentials."""

__version__ = "0.1.0"
