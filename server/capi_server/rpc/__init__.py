"""Transport: gRPC servicers (parse, validate, map errors), server wiring, the RPC guard."""
