"""Integration tests: real I/O against local fakes."""
