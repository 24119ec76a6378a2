"""`make bench`: throughput, latency, scale and memory of the real server process.

Every figure is a ratio to a trivial grpc.aio echo server measured by the same load
generator in the same run, because absolute times on a shared machine are noise.
See bench/README.md.
"""
