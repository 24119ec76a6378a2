"""capi protobuf packages."""
