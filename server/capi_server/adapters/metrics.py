"""Prometheus metrics: one registry of this package's own (not prometheus_client's global
one, so importing a library that registers metrics never changes what we expose) and an
HTTP endpoint on CAPI_METRICS_LISTEN, off by default.

Code that observes something calls one of the `observe_*` functions; they never raise and
cost a dictionary lookup, so call sites need no guard. Label values are low-cardinality by
construction: levels, statuses, Graph error codes, gRPC methods and codes, CRM types.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from capi_server.domain.events import EventOutcome, SendOutcome

log = logging.getLogger("capi_server.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

# Graph answers in under a second normally (1.5 s client timeout); RPCs may include a send.
_FAST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0)
_LLM_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)

RPC_REQUESTS = Counter(
    "capi_rpc_requests",
    "gRPC calls handled, by service, method and status code",
    ["service", "method", "code"],
    registry=REGISTRY,
)
RPC_DURATION = Histogram(
    "capi_rpc_duration_seconds",
    "gRPC call latency, by service and method",
    ["service", "method"],
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
EVENTS = Counter(
    "capi_events",
    "CAPI events by level, result (success, pending = queued for a retry, error, skipped) "
    "and Graph error code ('' when none)",
    ["level", "status", "error_code"],
    registry=REGISTRY,
)
DEDUP_HITS = Counter(
    "capi_dedup_hits",
    "Sends of a (dialog, level) that was already sent: answered ALREADY_SENT, not resent",
    ["level"],
    registry=REGISTRY,
)
GRAPH_DURATION = Histogram(
    "capi_graph_request_duration_seconds",
    "Graph API request latency, by edge (events, check_token) and outcome",
    ["edge", "outcome"],
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
GRAPH_BATCH_SIZE = Histogram(
    "capi_graph_batch_events",
    "Events per Graph /events request",
    buckets=_BATCH_BUCKETS,
    registry=REGISTRY,
)
BATCH_ITEMS = Histogram(
    "capi_batch_items",
    "Calls carried per group-commit batch (one transaction or one query), by batch",
    ["batch"],
    buckets=_BATCH_BUCKETS,
    registry=REGISTRY,
)
LLM_CALLS = Counter(
    "capi_llm_calls",
    "LLM calls by operation and outcome (ok, transient_error, permanent_error)",
    ["operation", "outcome"],
    registry=REGISTRY,
)
LLM_TOKENS = Counter(
    "capi_llm_tokens",
    "LLM tokens used, by operation and kind (prompt, completion)",
    ["operation", "kind"],
    registry=REGISTRY,
)
LLM_DURATION = Histogram(
    "capi_llm_request_duration_seconds",
    "Latency of successful LLM calls, by operation",
    ["operation"],
    buckets=_LLM_BUCKETS,
    registry=REGISTRY,
)
CRM_CALLS = Counter(
    "capi_crm_calls",
    "CRM REST calls by CRM type and outcome (ok, or the CrmError kind)",
    ["crm_type", "outcome"],
    registry=REGISTRY,
)


def _split_method(full_method: str) -> tuple[str, str]:
    """'/capi.v1.CapiSenderService/SendConversion' -> ('capi.v1.CapiSenderService', ...)."""
    service, _, method = full_method.strip("/").rpartition("/")
    return service or "unknown", method or full_method


@functools.lru_cache(maxsize=1024)
def _rpc_metrics(full_method: str, code: str) -> tuple[Any, Any]:
    """The labelled children of one (method, code): `labels()` validates and locks on every
    call, and this runs for every RPC. Bounded: methods and codes are finite."""
    service, method = _split_method(full_method)
    return RPC_REQUESTS.labels(service, method, code), RPC_DURATION.labels(service, method)


def observe_rpc(full_method: str, code: str, seconds: float) -> None:
    """The RPC guard's observe hook: one finished (or refused) gRPC call."""
    requests, duration = _rpc_metrics(full_method, code)
    requests.inc()
    duration.observe(seconds)


@functools.lru_cache(maxsize=4096)
def _event_counter(level: int, status: str, error_code: int | None) -> Any:
    """The labelled child of one (level, status, error code), as `_rpc_metrics` keeps
    them. Bounded: Meta's error codes are a short list in practice, and the cache too."""
    return EVENTS.labels(str(level), status, str(error_code) if error_code is not None else "")


@functools.lru_cache(maxsize=8)
def _dedup_counter(level: int) -> Any:
    return DEDUP_HITS.labels(str(level))


def observe_event(level: int, status: str, error_code: int | None = None) -> None:
    """One CAPI event reached a result (sent, queued for retry, failed, skipped)."""
    _event_counter(level, status, error_code).inc()


def observe_dedup_hit(level: int) -> None:
    _dedup_counter(level).inc()


def observe_graph_request(
    edge: str, outcome: str, seconds: float, batch_size: int | None = None
) -> None:
    """One Graph request; `batch_size` is the number of events of an /events request."""
    GRAPH_DURATION.labels(edge, outcome).observe(seconds)
    if batch_size is not None:
        GRAPH_BATCH_SIZE.observe(batch_size)


@functools.lru_cache(maxsize=64)
def _batch_histogram(batch: str) -> Any:
    return BATCH_ITEMS.labels(batch)


def observe_batch(batch: str, items: int) -> None:
    _batch_histogram(batch).observe(items)


def observe_llm_call(
    operation: str,
    outcome: str,
    seconds: float | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
) -> None:
    LLM_CALLS.labels(operation, outcome).inc()
    if seconds is not None:
        LLM_DURATION.labels(operation).observe(seconds)
    if prompt_tokens:
        LLM_TOKENS.labels(operation, "prompt").inc(prompt_tokens)
    if completion_tokens:
        LLM_TOKENS.labels(operation, "completion").inc(completion_tokens)


def observe_crm_call(crm_type: str, outcome: str) -> None:
    """One CRM call: `outcome` is "ok" or the CrmError kind (auth, rate_limited, ...)."""
    CRM_CALLS.labels(crm_type, outcome).inc()


# -- the retry queue, read at scrape time ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """Pending events (queued for a first send or a retry) and the oldest one's age."""

    depth: int
    oldest_pending_age_seconds: float


QueueSource = Callable[[], QueueSnapshot | None]


class QueueCollector(Collector):
    """Reads the queue through `source` on every scrape; emits nothing when it fails.

    A gauge that a worker pass updates would go stale exactly when the worker is stuck,
    which is when the numbers matter; reading at scrape time avoids that.
    """

    def __init__(self, source: QueueSource) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        try:
            snapshot = self._source()
        except Exception:
            log.warning("metrics: cannot read the retry queue", exc_info=True)
            snapshot = None
        if snapshot is None:
            return []
        return self._families(snapshot)

    @staticmethod
    def _families(snapshot: QueueSnapshot | None) -> list[Metric]:
        depth = GaugeMetricFamily(
            "capi_retry_queue_depth", "capi_events_log rows with status pending"
        )
        oldest = GaugeMetricFamily(
            "capi_retry_queue_oldest_pending_age_seconds",
            "Age of the oldest pending event (0 when none)",
        )
        if snapshot is not None:
            depth.add_metric([], snapshot.depth)
            oldest.add_metric([], snapshot.oldest_pending_age_seconds)
        return [depth, oldest]


class _Union(Collector):
    """Exposes several collectors (our registry plus per-endpoint ones) as one."""

    def __init__(self, parts: Iterable[Collector]) -> None:
        self._parts = list(parts)

    def collect(self) -> Iterator[Metric]:
        for part in self._parts:
            yield from part.collect()


def exposition_registry(queue_source: QueueSource | None = None) -> CollectorRegistry:
    """A registry that serves REGISTRY plus, when given, the queue gauges."""
    parts: list[Collector] = [REGISTRY]
    if queue_source is not None:
        parts.append(QueueCollector(queue_source))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Union(parts))
    return registry


def parse_listen(listen: str) -> tuple[str, int]:
    """'host:port' (or ':port', '[::1]:port') -> (host, port); ValueError when malformed."""
    host, sep, port_text = listen.strip().rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"CAPI_METRICS_LISTEN must be host:port, got {listen!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"CAPI_METRICS_LISTEN port out of range: {port}")
    return host.strip("[]") or "0.0.0.0", port


class MetricsEndpoint:
    """The /metrics HTTP server (prometheus_client's WSGI server on its own thread)."""

    def __init__(self, server: WSGIServer, thread: Thread) -> None:
        self._server = server
        self._thread = thread

    @classmethod
    def start(cls, listen: str, queue_source: QueueSource | None = None) -> MetricsEndpoint:
        host, port = parse_listen(listen)
        server, thread = start_http_server(
            port, addr=host, registry=exposition_registry(queue_source)
        )
        endpoint = cls(server, thread)
        log.info("metrics endpoint listening", extra={"address": host, "port": endpoint.port})
        return endpoint

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


# -- outcomes of the sender -------------------------------------------------------------------

_DELIVERED_STATUS = {
    SendOutcome.SENT: "success",
    SendOutcome.QUEUED: "pending",
    SendOutcome.FAILED: "error",
}


def observe_delivered(outcomes: Iterable[EventOutcome]) -> None:
    """Results of Graph sends (the sender's record step): success, pending (retry), error."""
    for outcome in outcomes:
        status = _DELIVERED_STATUS.get(outcome.outcome)
        if status is not None:
            observe_event(int(outcome.level), status, outcome.error_code)


def observe_planned(outcomes: Iterable[EventOutcome]) -> None:
    """Decisions made before sending: skipped events and dedup hits (ALREADY_SENT)."""
    for outcome in outcomes:
        if outcome.outcome is SendOutcome.SKIPPED:
            observe_event(int(outcome.level), "skipped")
        elif outcome.outcome is SendOutcome.ALREADY_SENT:
            observe_dedup_hit(int(outcome.level))


def observe_llm_completion(operation: str, seconds: float | None, usage: object | None) -> None:
    """A successful LLM call; `usage` is the SDK's CompletionUsage (or None)."""
    prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
    completion_tokens = getattr(usage, "completion_tokens", 0) or 0
    observe_llm_call(operation, "ok", seconds, int(prompt_tokens), int(completion_tokens))
