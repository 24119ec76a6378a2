"""capi server."""
