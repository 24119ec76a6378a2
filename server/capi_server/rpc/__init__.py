"""Transport: gRPC servicers (parse, validate, map errors), server wiring, interceptors."""
