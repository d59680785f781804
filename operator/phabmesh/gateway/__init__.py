"""The Conduit gateway: its own process, scaled horizontally, sharing only the API server."""
