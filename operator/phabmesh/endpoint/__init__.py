"""The credential endpoint (served by the operator process)."""
