"""The two processes phabmesh runs, each composed here from the parts it uses.

- ``operator``: the controller (kopf), the credential endpoint and the pod-injection
  webhook, with the watches they share;
- ``gateway``: the Conduit gateway and its watches, scaled on its own.
"""
