"""Generated gRPC stubs for capi.v1 (see `make proto`)."""
