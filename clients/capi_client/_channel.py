"""Channels to the capi server: target parsing, TLS, keepalive, retry policy, metadata.

Retries are gRPC's own (a service config `retryPolicy`), never hand-written loops: only
idempotent RPCs (see `_methods.IDEMPOTENT_METHODS`) are retried, on UNAVAILABLE (server
down or restarting) and RESOURCE_EXHAUSTED (server shedding load), with exponential
backoff and retry throttling. DEADLINE_EXCEEDED of the call's own deadline cannot be
retried by design: the deadline covers all attempts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from capi_client._methods import RPCS

DEFAULT_PORT = {"http": 80, "https": 443}

RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
}


def service_config() -> dict[str, Any]:
    """The gRPC service config: a retry policy for the idempotent RPCs only."""
    names = [
        {"service": rpc.service, "method": rpc.name} for rpc in RPCS.values() if rpc.idempotent
    ]
    return {
        "methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}],
        # Stop retrying when most calls fail, so a dead server is not hammered.
        "retryThrottling": {"maxTokens": 20, "tokenRatio": 0.1},
    }


CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(service_config())),
    # Notice dead connections (NAT timeouts, a killed server) within ~40 s. The server
    # allows pings every 10 s without calls.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly after a server restart instead of gRPC's default 1 s..120 s.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


@dataclass(frozen=True, slots=True)
class ChannelTarget:
    """Where to connect and how: `address` is what gRPC dials."""

    address: str
    tls: bool
    ca_file: str | None = None


def parse_target(target: str, *, tls: bool = False, ca_file: str | None = None) -> ChannelTarget:
    """`host:port` (plain unless tls/ca_file), `http://host:port` or `https://host[:port]`.

    Other gRPC target forms (`dns:///host:port`, `unix:/path`) pass through unchanged.
    """
    target = target.strip()
    if not target:
        raise ValueError("empty target")
    scheme, sep, rest = target.partition("://")
    if sep and scheme in DEFAULT_PORT:
        host = rest.rstrip("/")
        if not host or "/" in host:
            raise ValueError(f"bad target {target!r}: expected {scheme}://host:port")
        if scheme == "http" and (tls or ca_file):
            raise ValueError(f"target {target!r} is plain http but TLS was requested")
        if not _has_port(host):
            host = f"{host}:{DEFAULT_PORT[scheme]}"
        return ChannelTarget(host, scheme == "https", ca_file)
    return ChannelTarget(target, tls or ca_file is not None, ca_file)


def _has_port(host: str) -> bool:
    if host.startswith("["):  # [::1]:50051
        return "]:" in host
    return ":" in host


def _credentials(parsed: ChannelTarget) -> grpc.ChannelCredentials:
    roots = Path(parsed.ca_file).read_bytes() if parsed.ca_file else None
    # None means the system's trusted roots.
    return grpc.ssl_channel_credentials(root_certificates=roots)


def create_channel(
    target: str,
    *,
    tls: bool = False,
    ca_file: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A sync channel with keepalive and the retry policy."""
    parsed = parse_target(target, tls=tls, ca_file=ca_file)
    all_options = [*CHANNEL_OPTIONS, *options]
    if parsed.tls:
        return grpc.secure_channel(parsed.address, _credentials(parsed), options=all_options)
    return grpc.insecure_channel(parsed.address, options=all_options)


def create_aio_channel(
    target: str,
    *,
    tls: bool = False,
    ca_file: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An asyncio channel with keepalive and the retry policy."""
    parsed = parse_target(target, tls=tls, ca_file=ca_file)
    all_options = [*CHANNEL_OPTIONS, *options]
    if parsed.tls:
        return grpc.aio.secure_channel(parsed.address, _credentials(parsed), options=all_options)
    return grpc.aio.insecure_channel(parsed.address, options=all_options)


def call_metadata(token: str | None, request_id: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata: the bearer token and an optional x-request-id for log correlation."""
    metadata: list[tuple[str, str]] = []
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    if request_id:
        metadata.append(("x-request-id", request_id))
    return tuple(metadata)
