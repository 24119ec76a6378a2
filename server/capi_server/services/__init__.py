"""Application services: one use case per function, taking ports, returning domain objects."""
