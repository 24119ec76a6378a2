"""capi client."""
