"""The load generator: a separate process that keeps a fixed number of calls in flight.

It sends pre-built protobuf bytes over a grpc.aio channel (no stub, no response parsing),
so the client costs the same for the echo baseline and for every scenario. Throughput
counts the successful calls that complete inside the measuring window (after a warm-up,
before the deadline); latency percentiles come from the same calls.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from bench.echo import ECHO_METHOD
from capi.v1 import capi_sender_service_pb2 as spb
from capi.v1 import qualification_service_pb2 as qpb
from capi.v1 import resources_pb2 as res

METHODS = {
    "echo": ECHO_METHOD,
    "ingest": "/capi.v1.QualificationService/IngestMessage",
    "analyze": "/capi.v1.QualificationService/AnalyzeDialog",
    "check_crm": "/capi.v1.QualificationService/CheckCrmFields",
    "send": "/capi.v1.CapiSenderService/SendConversion",
    "list_events": "/capi.v1.CapiSenderService/ListEvents",
    "health": "/grpc.health.v1.Health/Check",
}

MESSAGE_TEXT = "Здравствуйте! Сколько стоит консультация и можно записаться на завтра?"


def phone(n: int) -> str:
    """A distinct valid Kazakh mobile number per n < 10**7 ("+7701" + 7 digits)."""
    return f"+7701{n:07d}"


RequestFactory = Callable[[int], bytes]


def make_factory(kind: str, params: dict[str, Any]) -> RequestFactory:
    """Call i's request bytes for a scenario kind (see METHODS)."""
    if kind == "echo" or kind == "ingest":
        instance = str(params.get("instance_name", "bench"))
        base = int(params.get("phone_base", 0))
        per_dialog = int(params.get("messages_per_dialog", 1))
        prefix = str(params.get("message_prefix", "m"))

        def ingest(i: int) -> bytes:
            return qpb.IngestMessageRequest(
                instance_name=instance,
                contact_phone=phone(base + i // per_dialog),
                message_id=f"{prefix}{base}-{i}",
                text=MESSAGE_TEXT,
            ).SerializeToString()

        return ingest
    if kind == "send":
        instance = str(params["instance_name"])
        base = int(params["phone_base"])
        cycle = int(params.get("phone_count", 0))

        def send(i: int) -> bytes:
            n = base + (i % cycle if cycle else i)
            return spb.SendConversionRequest(
                instance_name=instance, contact_phone=phone(n), level=res.LEVEL_INTEREST
            ).SerializeToString()

        return send
    if kind == "analyze":
        dialogs = [str(d) for d in params["dialog_ids"]]
        force = bool(params.get("force", False))
        prebuilt = [
            qpb.AnalyzeDialogRequest(dialog_id=d, force=force).SerializeToString() for d in dialogs
        ]
        return lambda i: prebuilt[i % len(prebuilt)]
    if kind == "list_events":
        direction_id = str(params["direction_id"])
        pages = [
            spb.ListEventsRequest(
                direction_id=direction_id, page_size=int(params.get("page_size", 50)), page_token=t
            ).SerializeToString()
            for t in params["page_tokens"]
        ]
        return lambda i: pages[i % len(pages)]
    if kind == "check_crm":
        direction_id = str(params["direction_id"])
        checks = [
            qpb.CheckCrmFieldsRequest(
                direction_id=direction_id, entity_type="lead", entity_id=str(e)
            ).SerializeToString()
            for e in params["entity_ids"]
        ]
        return lambda i: checks[i % len(checks)]
    if kind == "health":
        check = health_pb2.HealthCheckRequest().SerializeToString()
        return lambda i: check
    raise ValueError(f"unknown load kind {kind!r}")


@dataclass(frozen=True, slots=True)
class LoadSpec:
    name: str
    target: str
    kind: str
    params: dict[str, Any]
    concurrency: int
    seconds: float
    max_calls: int
    warmup_seconds: float = 0.0
    timeout_seconds: float = 60.0


@dataclass
class LoadResult:
    name: str
    calls: int = 0
    issued: int = 0
    ok_total: int = 0
    window_seconds: float = 0.0
    calls_per_second: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str = ""
    total_seconds: float = 0.0


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


async def _drive(spec: LoadSpec) -> LoadResult:
    factory = make_factory(spec.kind, spec.params)
    result = LoadResult(name=spec.name)
    errors: Counter[str] = Counter()
    completions: list[tuple[float, float]] = []  # (end time, latency)
    async with grpc.aio.insecure_channel(spec.target) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            METHODS[spec.kind]
        )
        await channel.channel_ready()
        start = time.perf_counter()
        deadline = start + spec.seconds
        issued = 0

        async def worker() -> None:
            nonlocal issued
            while issued < spec.max_calls and time.perf_counter() < deadline:
                index = issued
                issued += 1
                request = factory(index)
                began = time.perf_counter()
                try:
                    await call(request, timeout=spec.timeout_seconds)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    if not result.first_error:
                        result.first_error = f"{exc.code().name}: {exc.details()}"
                    continue
                ended = time.perf_counter()
                completions.append((ended, ended - began))

        await asyncio.gather(*(worker() for _ in range(min(spec.concurrency, spec.max_calls))))
        finished = time.perf_counter()
    window_start = start + spec.warmup_seconds
    last = max((end for end, _ in completions), default=finished)
    window_end = min(deadline, last)
    in_window = sorted(lat for end, lat in completions if window_start <= end <= window_end)
    result.issued = issued
    result.ok_total = len(completions)
    result.calls = len(in_window)
    result.window_seconds = max(window_end - window_start, 1e-9)
    result.calls_per_second = result.calls / result.window_seconds
    result.p50_ms = _percentile(in_window, 0.50) * 1000
    result.p99_ms = _percentile(in_window, 0.99) * 1000
    result.errors = dict(errors)
    result.total_seconds = finished - start
    return result


async def _drive_all(specs: list[LoadSpec]) -> list[LoadResult]:
    return list(await asyncio.gather(*(_drive(spec) for spec in specs)))


def run_load(specs: list[LoadSpec], results: Queue[list[LoadResult] | str]) -> None:
    """Process entry: drives every spec at the same time; puts the results (or an error)."""
    try:
        results.put(asyncio.run(_drive_all(specs)))
    except Exception as exc:  # reported by the orchestrator, which decides what it means
        results.put(f"{type(exc).__name__}: {exc}")
