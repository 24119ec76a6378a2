"""`make bench` / `python -m bench.run`: the benchmark of issue 8 (see bench/README.md).

Processes: the real server (`python -m capi_server serve --migrate`) on a fresh
PostgreSQL database, the fakes (Graph + OpenAI + amoCRM), the echo baseline, and one
load-generator process per measurement. Everything binds to 127.0.0.1 and every step is
bounded in calls and seconds. The last line printed is the machine-readable summary.

Environment (all optional):
- BENCH_SECONDS: seconds per scenario, default 10; 3 is a smoke run.
- BENCH_CONCURRENCY: calls in flight, 32. BENCH_MAX_CALLS: per scenario, 300000.
- BENCH_SCALE_ROWS: rows per table for the scale runs, 1000000 (50000 when
  BENCH_SECONDS < 5; 0 skips).
- BENCH_RSS_MESSAGES: messages ingested before reading RSS, 200000 (20000 x BENCH_SECONDS
  when smaller), within BENCH_RSS_SECONDS (30 x BENCH_SECONDS). BENCH_BURST: 10000 calls.
- BENCH_CRM_DEALS: deals in the mass webhook, 1000. BENCH_CRM_RATE: see crm_server.py.
- BENCH_SQLITE=1: also run ingest/send on SQLite.
- BENCH_PROFILE: 1 when BENCH_SECONDS >= 5 (profiles of ingest, send_new, analyze_unchanged);
  BENCH_PROFILER=py-spy samples with py-spy (a dev dependency) from outside the server,
  BENCH_PROFILER=cprofile uses cProfile instead of bench.sampler.
- BENCH_WRITE_README: 1 when BENCH_SECONDS >= 10 and BENCH_ONLY is not set (refresh the
  results in bench/README.md).
- BENCH_ONLY: comma-separated steps (core, crm, scale, memory, sqlite, profile).
- BENCH_KEEP_LOGS=1 keeps the server logs.
- BENCH_EVENT_LOOP: the servers' CAPI_EVENT_LOOP (auto, uvloop, asyncio); default auto.
- CAPI_TEST_DATABASE_URL (the PostgreSQL admin URL).
"""

from __future__ import annotations

import json
import os
import platform
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from bench import database, sampler
from bench.echo import serve_echo
from bench.fakes import serve_fakes
from bench.load import LoadResult, LoadSpec, phone
from bench.processes import ChildProcess, CpuMeter, ServerProcess, drive, free_port, rss_mb
from capi.v1 import capi_sender_service_pb2 as spb
from capi.v1 import capi_sender_service_pb2_grpc as spb_grpc
from capi.v1 import qualification_service_pb2 as qpb
from capi.v1 import qualification_service_pb2_grpc as qpb_grpc
from capi.v1 import resources_pb2 as res
from capi.v1 import settings_service_pb2 as setpb
from capi.v1 import settings_service_pb2_grpc as setpb_grpc

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
README_START = "<!-- bench:results:start -->"
README_END = "<!-- bench:results:end -->"

PIXEL_ID = "1234567890"
USER_TOKEN = "EAAB-bench-user-token"
AMO_INTEREST = res.CrmField(field_id="1271495", field_type="select", enum_id="919467")
PROMPT = (
    "Dental clinic. Questions: 1) which tooth hurts? 2) since when? "
    "Booking: the client confirms a visit time."
)
# Disjoint phone ranges per scenario (phone(n), n < 10**7), so "new" always means new.
PHONES = {
    "ingest": 0,
    "send_new": 1_000_000,
    "analyze": 2_000_000,
    "ingest_big": 3_000_000,
    "send_new_big": 4_000_000,
    "rss": 5_000_000,
    "burst": 6_000_000,
    "profile_ingest": 7_000_000,
    "profile_send_new": 8_000_000,
    "profile_analyze_unchanged": 8_800_000,
    "sqlite": 9_000_000,
}
# AnalyzeDialog calls waiting on the slow LLM at once, beside the send_dup load.
LLM_IN_FLIGHT = 8
# py-spy samples per second (it stops the server briefly for each sample).
PY_SPY_RATE = 200
# Real CRM limits, to compare the service's own time with (requests per second).
AMOCRM_REAL_RATE = 7.0


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if not raw else raw in ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    seconds: float
    concurrency: int
    max_calls: int
    small_rows: int
    scale_rows: int
    rss_messages: int
    rss_seconds: float
    burst_calls: int
    crm_deals: int
    sqlite: bool
    profile: bool
    write_readme: bool

    @classmethod
    def from_env(cls) -> BenchConfig:
        seconds = _env_number("BENCH_SECONDS", 10.0)
        return cls(
            seconds=seconds,
            concurrency=int(_env_number("BENCH_CONCURRENCY", 32)),
            max_calls=int(_env_number("BENCH_MAX_CALLS", 300_000)),
            small_rows=1000,
            scale_rows=int(_env_number("BENCH_SCALE_ROWS", 1_000_000 if seconds >= 5 else 50_000)),
            rss_messages=int(
                _env_number("BENCH_RSS_MESSAGES", min(200_000, int(20_000 * seconds)))
            ),
            rss_seconds=_env_number("BENCH_RSS_SECONDS", max(30.0, 30.0 * seconds)),
            burst_calls=int(_env_number("BENCH_BURST", 10_000)),
            crm_deals=int(_env_number("BENCH_CRM_DEALS", 1000)),
            sqlite=_env_flag("BENCH_SQLITE", False),
            profile=_env_flag("BENCH_PROFILE", seconds >= 5),
            # A partial run (BENCH_ONLY) would replace the full table with a few rows.
            write_readme=_env_flag(
                "BENCH_WRITE_README", seconds >= 10 and not os.environ.get("BENCH_ONLY")
            ),
        )


@dataclass
class Row:
    scenario: str
    result: LoadResult | None
    ratio: float | None
    note: str = ""
    # CPU cores used while it ran: "server" (the process under test), "fakes", "postgres".
    cpu: dict[str, float] = field(default_factory=dict)
    # The echo runs just before and just after it, when its ratio is to their mean.
    echo_around: tuple[float, float] | None = None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    summary: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    crm: dict[str, float] = field(default_factory=dict)
    plans: list[tuple[database.HotQuery, str]] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def say(text: str) -> None:
    print(text, flush=True)


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return (
        f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}"
    )


class Fakes:
    """Client of the fakes process's control routes."""

    def __init__(self, port: int) -> None:
        self.base_url = f"http://127.0.0.1:{port}"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base_url}/_stats", timeout=10) as answer:
            stats: dict[str, Any] = json.loads(answer.read())
        return stats

    def post(self, path: str, body: dict[str, Any]) -> None:
        request = urllib.request.Request(
            f"{self.base_url}{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            answer.read()


@dataclass
class Stubs:
    channel: grpc.Channel
    settings: Any
    sender: Any
    qualification: Any

    @classmethod
    def open(cls, target: str) -> Stubs:
        channel = grpc.insecure_channel(target)
        return cls(
            channel,
            setpb_grpc.SettingsServiceStub(channel),
            spb_grpc.CapiSenderServiceStub(channel),
            qpb_grpc.QualificationServiceStub(channel),
        )


@dataclass(frozen=True, slots=True)
class WhatsAppSetup:
    account_id: str
    direction_id: str
    instance_name: str


def whatsapp_direction(stubs: Stubs, instance_name: str) -> WhatsAppSetup:
    account = stubs.settings.CreateUserAccount(
        setpb.CreateUserAccountRequest(
            user_account=res.UserAccount(name="Bench", access_token=USER_TOKEN, default_region="KZ")
        ),
        timeout=30,
    )
    direction = stubs.settings.CreateDirection(
        setpb.CreateDirectionRequest(
            direction=res.Direction(
                user_account_id=account.user_account.id,
                name="Bench WhatsApp",
                instance_name=instance_name,
                pixel_id=PIXEL_ID,
                qualification_prompt=PROMPT,
                capi=res.CapiSettings(enabled=True, source=res.CAPI_SOURCE_WHATSAPP),
            )
        ),
        timeout=30,
    )
    return WhatsAppSetup(account.user_account.id, direction.direction.id, instance_name)


class Bench:
    def __init__(self, config: BenchConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.report = Report()
        self.echo_cps = 0.0
        # The latest echo rate measured (measure_bracketed).
        self.echo_near = 0.0
        self.db_url = ""
        self.fakes: Fakes | None = None
        self.echo_target = ""
        self._children: list[ChildProcess] = []
        self._servers: list[ServerProcess] = []
        # Processes whose CPU use is reported per scenario.
        self.watched: dict[str, int] = {}
        # Databases of the scale step, dropped by close().
        self.extra_databases: list[str] = []
        # The Prometheus endpoint of each server, by gRPC target (batch sizes per scenario).
        self.metrics_urls: dict[str, str] = {}

    # -- processes ----------------------------------------------------------------------

    def server_env(self, database_url: str) -> dict[str, str]:
        assert self.fakes is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPI_", "OPENAI_"))}
        env.update(
            {
                "CAPI_DATABASE_URL": database_url,
                "CAPI_INSECURE_DEV": "true",
                "CAPI_META_GRAPH_URL": self.fakes.base_url,
                "OPENAI_API_KEY": "sk-bench",
                "OPENAI_BASE_URL": f"{self.fakes.base_url}/v1",
                "CAPI_RETRY_BASE_SECONDS": "1",
                "CAPI_RETRY_MAX_SECONDS": "5",
                "CAPI_EVENT_LOOP": os.environ.get("BENCH_EVENT_LOOP", "auto"),
                "PYTHONPATH": os.pathsep.join(
                    [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
                ),
            }
        )
        return env

    def start_server(
        self,
        name: str,
        database_url: str,
        args: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> ServerProcess:
        metrics_port = free_port()
        server = ServerProcess(
            args or ["-m", "capi_server", "serve", "--migrate"],
            {
                **self.server_env(database_url),
                "CAPI_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
                **(extra_env or {}),
            },
            self.workdir / f"{name}.log",
        )
        self._servers.append(server)
        server.wait_serving()
        self.metrics_urls[server.target] = f"http://127.0.0.1:{metrics_port}/metrics"
        return server

    def stop_server(self, server: ServerProcess) -> None:
        server.stop()
        if server in self._servers:
            self._servers.remove(server)

    def close(self) -> None:
        for server in self._servers:
            server.stop(timeout=15)
        for child in self._children:
            child.stop()
        for url in self.extra_databases:
            try:
                database.drop_database(url)
            except psycopg.Error as exc:
                say(f"bench: could not drop a scale database: {exc}")
        self.extra_databases.clear()

    # -- measuring ----------------------------------------------------------------------

    def spec(
        self, name: str, target: str, kind: str, params: dict[str, Any], **kw: Any
    ) -> LoadSpec:
        values: dict[str, Any] = {
            "concurrency": self.config.concurrency,
            "seconds": self.config.seconds,
            "max_calls": self.config.max_calls,
            "warmup_seconds": min(1.0, self.config.seconds * 0.1),
        }
        values.update(kw)
        return LoadSpec(name=name, target=target, kind=kind, params=params, **values)

    def measure(self, spec: LoadSpec, *, echo: float | None = None, note: str = "") -> LoadResult:
        meter = CpuMeter(self.watched)
        batches_before = self.batch_totals(spec.target)
        (result,) = drive([spec])
        cpu = meter.cores()
        batched = batch_sizes(batches_before, self.batch_totals(spec.target))
        note = "; ".join(filter(None, [note, batched]))
        self.record(result, echo=echo, note=note, cpu=cpu)
        return result

    def measure_bracketed(self, spec: LoadSpec, *, note: str = "") -> float:
        """Measures a scenario, then echo again; returns the scenario's ratio to the mean of
        the echo runs just before and just after it.

        This machine's echo rate drifts by 10-30% within minutes (other tenants), so one
        echo figure measured minutes earlier would move every later ratio with it; the two
        runs around a scenario bound what the machine gave while it ran.
        """
        if not self.echo_near:  # a step run without the core step's echo
            (first,) = drive([self.spec("echo", self.echo_target, "echo", {})])
            self.echo_near = first.calls_per_second
        result = self.measure(spec, note=note)
        (after,) = drive([self.spec("echo", self.echo_target, "echo", {})])
        before, self.echo_near = self.echo_near, after.calls_per_second
        row = self.report.rows[-1]
        row.echo_around = (before, self.echo_near)
        base = (before + self.echo_near) / 2
        row.ratio = result.calls_per_second / base if base else None
        say(
            f"  {'':<26} echo before/after {before:.0f}/{self.echo_near:.0f} calls/s: "
            f"ratio to their mean {row.ratio or 0:.2f}"
        )
        return row.ratio or 0.0

    def batch_totals(self, target: str) -> dict[str, list[float]]:
        """{batch: [batches, calls]} from the server's capi_batch_items metric so far."""
        url = self.metrics_urls.get(target)
        if url is None:
            return {}
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                text = answer.read().decode()
        except OSError:
            return {}
        totals: dict[str, list[float]] = {}
        for family in text_string_to_metric_families(text):
            if family.name != "capi_batch_items":
                continue
            for sample in family.samples:
                slot = {"capi_batch_items_count": 0, "capi_batch_items_sum": 1}.get(sample.name)
                if slot is not None:
                    totals.setdefault(sample.labels["batch"], [0.0, 0.0])[slot] = sample.value
        return totals

    def record(
        self,
        result: LoadResult,
        *,
        echo: float | None = None,
        note: str = "",
        cpu: dict[str, float] | None = None,
    ) -> None:
        base = echo if echo is not None else self.echo_near
        ratio = result.calls_per_second / base if base else None
        if result.errors:
            errors = ", ".join(f"{k}={v}" for k, v in sorted(result.errors.items()))
            note = f"{note}; errors {errors} ({result.first_error[:120]})".lstrip("; ")
        self.report.rows.append(Row(result.name, result, ratio, note, cpu or {}))
        ratio_text = f"{ratio:.2f}" if ratio is not None else "-"
        say(
            f"  {result.name:<26} {result.calls:>7} calls {result.calls_per_second:>8.1f}/s "
            f"p50 {result.p50_ms:>7.1f} ms p99 {result.p99_ms:>8.1f} ms ratio {ratio_text} "
            f"cpu {cpu_text(cpu or {}, result.calls_per_second)}" + (f"  [{note}]" if note else "")
        )

    def skip(self, scenario: str, why: str) -> None:
        self.report.rows.append(Row(scenario, None, None, f"skipped: {why}"))
        say(f"  {scenario:<26} skipped: {why}")

    # -- the run ------------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.config
        say(f"bench: {machine()}")
        say(
            f"bench: {cfg.seconds:g}s per scenario, {cfg.concurrency} calls in flight, "
            f"scale rows {cfg.scale_rows}, RSS messages {cfg.rss_messages}"
        )
        self.db_url = database.create_database()
        say(f"bench: database {self.db_url.rsplit('/', 1)[-1]} created")
        fakes = ChildProcess(serve_fakes, "bench-fakes")
        self._children.append(fakes)
        self.fakes = Fakes(fakes.port)
        echo = ChildProcess(serve_echo, "bench-echo")
        self._children.append(echo)
        self.echo_target = f"127.0.0.1:{echo.port}"
        assert fakes.process.pid is not None and echo.process.pid is not None
        self.watched = {"fakes": fakes.process.pid, "echo": echo.process.pid}

        server = self.start_server("server", self.db_url)
        self.watched["server"] = server.pid
        self.report.memory["rss_start_mb"] = rss_mb(server.pid)
        stubs = Stubs.open(server.target)
        wa = whatsapp_direction(stubs, "bench-wa")
        database.seed_rows(
            self.db_url,
            direction_id=int(wa.direction_id),
            instance_name=wa.instance_name,
            pixel_id=PIXEL_ID,
            target_rows=cfg.small_rows,
        )
        self.report.counts["small"] = database.table_counts(self.db_url)
        say(f"bench: tables before the scenarios: {self.report.counts['small']}")

        self.step("core", lambda: self.core_scenarios(server, stubs, wa))
        self.step("crm", lambda: self.crm_scenarios(server, stubs))
        self.step("scale", self.scale)
        self.step("memory", lambda: self.memory(server, wa))
        stubs.channel.close()
        self.stop_server(server)
        if cfg.sqlite:
            self.step("sqlite", self.sqlite)
        if cfg.profile:
            self.step("profile", lambda: self.profile(wa))

    def step(self, name: str, action: Any) -> None:
        only = {s.strip() for s in os.environ.get("BENCH_ONLY", "").split(",") if s.strip()}
        if only and name not in only:
            say(f"bench: -- {name} skipped (BENCH_ONLY)")
            return
        say(f"bench: -- {name}")
        started = time.monotonic()
        try:
            action()
        except Exception as exc:
            traceback.print_exc()
            self.report.notes.append(f"step {name} failed: {type(exc).__name__}: {exc}")
            say(f"bench: step {name} failed: {exc}")
        say(f"bench: -- {name} took {time.monotonic() - started:.0f}s")

    def analyzed_dialogs(
        self, target: str, wa_params: dict[str, Any], phone_base: int, dialogs: int = 200
    ) -> tuple[list[int], LoadResult]:
        """Dialogs with two client messages each, analysed once (LLM): what AnalyzeDialog
        "unchanged" then asks about. Returns their ids and the first analysis' load."""
        drive(
            [
                self.spec(
                    "analyze_prep_ingest",
                    target,
                    "ingest",
                    {**wa_params, "phone_base": phone_base, "messages_per_dialog": 2},
                    max_calls=dialogs * 2,
                    seconds=120,
                    warmup_seconds=0,
                )
            ]
        )
        dialog_ids = dialogs_of_phones(self.db_url, phone_base, dialogs)
        (first,) = drive(
            [
                self.spec(
                    "analyze_prep",
                    target,
                    "analyze",
                    {"dialog_ids": dialog_ids},
                    max_calls=len(dialog_ids),
                    seconds=120,
                    warmup_seconds=0,
                    concurrency=16,
                )
            ]
        )
        return dialog_ids, first

    def core_scenarios(self, server: ServerProcess, stubs: Stubs, wa: WhatsAppSetup) -> None:
        assert self.fakes is not None
        target = server.target
        wa_params: dict[str, Any] = {"instance_name": wa.instance_name}
        echo = self.measure(self.spec("echo", self.echo_target, "echo", wa_params))
        self.echo_cps = self.echo_near = echo.calls_per_second
        self.report.rows[-1].ratio = 1.0
        self.report.summary["echo_cps"] = f"{self.echo_cps:.0f}"
        # The capi server's own floor: its gRPC stack and RPC guard, no work behind.
        health = self.measure_bracketed(
            self.spec("health", target, "health", {}),
            note="grpc.health.v1 Check: this server's gRPC stack and RPC guard, no work",
        )
        self.report.summary["health"] = f"{health:.2f}"

        ingest = self.measure_bracketed(
            self.spec("ingest", target, "ingest", {**wa_params, "phone_base": PHONES["ingest"]})
        )
        self.report.summary["ingest"] = f"{ingest:.2f}"

        before = self.fakes.stats()
        send_new_spec = self.spec(
            "send_new", target, "send", {**wa_params, "phone_base": PHONES["send_new"]}
        )
        send_new_ratio = self.measure_bracketed(send_new_spec)
        send_new = self.report.rows[-1].result
        assert send_new is not None
        after = self.fakes.stats()
        posts = after["graph_posts"] - before["graph_posts"]
        events = after["graph_events"] - before["graph_events"]
        self.report.rows[-1].note = (
            f"{events} events in {posts} Graph requests for {send_new.ok_total} OK calls; "
            f"{self.report.rows[-1].note}"
        )
        self.report.summary["send_new"] = f"{send_new_ratio:.2f}"

        dup_params = {
            **wa_params,
            "phone_base": PHONES["send_new"],
            "phone_count": max(1, min(send_new.ok_total, 1000)),
        }
        before = self.fakes.stats()
        send_dup_ratio = self.measure_bracketed(self.spec("send_dup", target, "send", dup_params))
        send_dup = self.report.rows[-1].result
        assert send_dup is not None
        after = self.fakes.stats()
        self.report.rows[-1].note = (
            f"Graph requests during: {after['graph_posts'] - before['graph_posts']}; "
            f"{self.report.rows[-1].note}"
        )
        self.report.summary["send_dup"] = f"{send_dup_ratio:.2f}"

        dialog_ids, first = self.analyzed_dialogs(target, wa_params, PHONES["analyze"])
        llm_before = self.fakes.stats()["llm_requests"]
        analyze = self.measure_bracketed(
            self.spec("analyze_unchanged", target, "analyze", {"dialog_ids": dialog_ids})
        )
        llm_after = self.fakes.stats()["llm_requests"]
        grew = llm_after - llm_before
        self.report.rows[-1].note = (
            f"LLM requests during: {grew} (first analysis of {len(dialog_ids)} dialogs: "
            f"{first.ok_total} OK); {self.report.rows[-1].note}"
        )
        self.report.summary["analyze_unchanged"] = f"{analyze:.2f}"
        self.report.summary["analyze_llm_calls"] = str(grew)

        # Slow LLM: send_dup measured while forced analyses wait 200 ms on the LLM each.
        self.fakes.post("/_config", {"llm_delay": 0.2})
        try:
            llm_before = self.fakes.stats()["llm_requests"]
            meter = CpuMeter(self.watched)
            during, slow = drive(
                [
                    self.spec("send_dup_during_llm", target, "send", dup_params),
                    self.spec(
                        "analyze_llm_200ms",
                        target,
                        "analyze",
                        {"dialog_ids": dialog_ids, "force": True},
                        concurrency=LLM_IN_FLIGHT,
                    ),
                ]
            )
            cpu = meter.cores()
            llm_calls = self.fakes.stats()["llm_requests"] - llm_before
        finally:
            self.fakes.post("/_config", {"llm_delay": 0.0})
        alone = send_dup.calls_per_second
        kept = during.calls_per_second / alone if alone else 0.0
        self.record(
            during,
            note=f"{kept:.2f} of send_dup alone while {llm_calls} LLM calls of 200 ms ran",
            cpu=cpu,
        )
        self.record(
            slow,
            note=f"AnalyzeDialog force=true, {LLM_IN_FLIGHT} in flight, LLM answers in 200 ms",
            cpu=cpu,
        )
        self.report.summary["llm_delay_send_dup"] = (
            f"{during.calls_per_second / self.echo_near:.2f}"
        )
        self.report.summary["llm_nonblocking"] = f"{kept:.2f}"

        tokens = page_tokens(stubs, wa.direction_id, pages=100)
        list_events = self.measure_bracketed(
            self.spec(
                "list_events",
                target,
                "list_events",
                {"direction_id": wa.direction_id, "page_tokens": tokens, "page_size": 50},
            ),
            note=f"50 rows per page, cycling {len(tokens)} pages",
        )
        self.report.summary["list_events"] = f"{list_events:.2f}"

    def crm_scenarios(self, server: ServerProcess, stubs: Stubs) -> None:
        assert self.fakes is not None
        try:
            stubs.qualification.CheckCrmFields(qpb.CheckCrmFieldsRequest(), timeout=10)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.skip("check_crm", "CheckCrmFields is UNIMPLEMENTED")
                self.skip("crm_mass", "HandleCrmWebhook is UNIMPLEMENTED")
                return
        rate = os.environ.get("BENCH_CRM_RATE", "100000")
        crm_server = self.start_server(
            "crm_server",
            self.db_url,
            ["-m", "bench.crm_server", "serve"],
            # The Settings knobs where they exist; bench.crm_server patches older servers.
            {
                "CAPI_CRM_AMOCRM_RATE_PER_SECOND": rate,
                "CAPI_CRM_BITRIX24_RATE_PER_SECOND": rate,
            },
        )
        self.watched["crm_server"] = crm_server.pid
        try:
            self._crm(crm_server)
        finally:
            self.watched.pop("crm_server", None)
            self.stop_server(crm_server)

    def _crm(self, crm_server: ServerProcess) -> None:
        assert self.fakes is not None
        stats = self.fakes.stats()
        stubs = Stubs.open(crm_server.target)
        account = stubs.settings.CreateUserAccount(
            setpb.CreateUserAccountRequest(
                user_account=res.UserAccount(
                    name="Bench CRM", access_token=USER_TOKEN, default_region="BR"
                )
            ),
            timeout=30,
        )
        connection = stubs.settings.CreateCrmConnection(
            setpb.CreateCrmConnectionRequest(
                crm_connection=res.CrmConnection(
                    user_account_id=account.user_account.id,
                    crm_type=res.CRM_TYPE_AMOCRM,
                    base_url=stats["amo_url"],
                    access_token=stats["amo_token"],
                    application_token="bench-app-token",
                )
            ),
            timeout=30,
        )
        portal = "benchportal"
        database.execute(
            self.db_url,
            "UPDATE crm_connections SET portal = %(p)s WHERE id = %(i)s",
            {"p": portal, "i": int(connection.crm_connection.id)},
        )
        direction = stubs.settings.CreateDirection(
            setpb.CreateDirectionRequest(
                direction=res.Direction(
                    user_account_id=account.user_account.id,
                    name="Bench CRM",
                    pixel_id=PIXEL_ID,
                    capi=res.CapiSettings(
                        enabled=True,
                        source=res.CAPI_SOURCE_CRM,
                        crm_type=res.CRM_TYPE_AMOCRM,
                        crm_connection_id=connection.crm_connection.id,
                        interest_fields=[AMO_INTEREST],
                    ),
                )
            ),
            timeout=30,
        )
        direction_id = direction.direction.id
        check_base, mass_base = 20_000_000, 30_000_000
        self.fakes.post("/_amo_leads", {"base": check_base, "count": 200, "phone_prefix": "+5521"})
        self.fakes.post(
            "/_amo_leads",
            {"base": mass_base, "count": self.config.crm_deals, "phone_prefix": "+55 11 9"},
        )
        before = self.fakes.stats()
        check_ratio = self.measure_bracketed(
            self.spec(
                "check_crm",
                crm_server.target,
                "check_crm",
                {
                    "direction_id": direction_id,
                    "entity_ids": [check_base + i for i in range(200)],
                },
            )
        )
        check = self.report.rows[-1].result
        assert check is not None
        after = self.fakes.stats()
        amo_per_call = (after["amo_requests"] - before["amo_requests"]) / max(1, check.ok_total)
        self.report.rows[-1].note = (
            f"{amo_per_call:.1f} amoCRM requests per call (limiter raised, see crm_server.py); "
            f"{self.report.rows[-1].note}"
        )
        self.report.summary["check_crm"] = f"{check_ratio:.2f}"

        deals = self.config.crm_deals
        pairs = [
            f"leads[status][{i}][id]={mass_base + i}&leads[status][{i}][status_id]=142"
            for i in range(deals)
        ]
        body = ("&".join(pairs) + f"&account[subdomain]={portal}").encode()
        before = self.fakes.stats()
        started = time.time()
        answer = stubs.qualification.HandleCrmWebhook(
            qpb.HandleCrmWebhookRequest(
                body=body, content_type="application/x-www-form-urlencoded"
            ),
            timeout=900,
        )
        answered = time.time()
        deadline = time.monotonic() + 60
        stats = self.fakes.stats()
        while (
            stats["graph_events"] - before["graph_events"] < deals and time.monotonic() < deadline
        ):
            time.sleep(0.1)
            stats = self.fakes.stats()
        stubs.channel.close()
        events = stats["graph_events"] - before["graph_events"]
        graph_requests = stats["graph_posts"] - before["graph_posts"]
        amo_requests = stats["amo_requests"] - before["amo_requests"]
        done = stats["graph_last_event_at"] - started if events else answered - started
        crm_bound = amo_requests / AMOCRM_REAL_RATE
        sent = sum(
            1 for r in answer.results for e in r.events if e.outcome == res.SEND_OUTCOME_SENT
        )
        self.report.crm = {
            "deals": deals,
            "events_at_graph": events,
            "graph_requests": graph_requests,
            "amo_requests": amo_requests,
            "seconds_to_last_event": done,
            "seconds_to_answer": answered - started,
            "amocrm_limit_seconds": crm_bound,
            "sent_outcomes": sent,
        }
        note = (
            f"{events} events in {graph_requests} Graph requests, {done:.1f}s to the last "
            f"event; {amo_requests} amoCRM reads = {crm_bound:.0f}s at amoCRM's 7 req/s"
        )
        self.report.rows.append(Row("crm_mass", None, None, note))
        say(f"  {'crm_mass':<26} {note}")
        self.report.summary["crm_mass_requests"] = str(graph_requests)
        self.report.summary["crm_mass_s"] = f"{done:.1f}"

    def scale(self) -> None:
        """ingest and send_new at 1,000 vs BENCH_SCALE_ROWS rows, interleaved.

        Two fresh databases (1,000 rows; BENCH_SCALE_ROWS rows) with a server each; the
        runs alternate small/big twice with half the time each, so drift in the machine's
        load hits both sizes alike, and the ratio is big/small throughput directly.
        """
        cfg = self.config
        if cfg.scale_rows <= cfg.small_rows:
            self.skip("scale", "BENCH_SCALE_ROWS is 0")
            return
        sizes = {"small": cfg.small_rows, "big": cfg.scale_rows}
        urls: dict[str, str] = {}
        servers: dict[str, ServerProcess] = {}
        setups: dict[str, WhatsAppSetup] = {}
        main_server = self.watched.get("server")
        try:
            for size, rows in sizes.items():
                urls[size] = database.create_database(f"capi_bench_{size}")
                self.extra_databases.append(urls[size])
                servers[size] = self.start_server(f"server_{size}", urls[size])
                stubs = Stubs.open(servers[size].target)
                setups[size] = whatsapp_direction(stubs, "bench-wa")
                stubs.channel.close()
                started = time.monotonic()
                database.seed_rows(
                    urls[size],
                    direction_id=int(setups[size].direction_id),
                    instance_name=setups[size].instance_name,
                    pixel_id=PIXEL_ID,
                    target_rows=rows,
                )
                self.report.counts[size] = database.table_counts(urls[size])
                say(
                    f"bench: {size} database seeded in {time.monotonic() - started:.0f}s: "
                    f"{self.report.counts[size]}"
                )
            totals: dict[tuple[str, str], float] = {}
            for round_ in range(2):
                for op, kind in (("ingest", "ingest"), ("send_new", "send")):
                    for size in sizes:
                        self.watched["server"] = servers[size].pid
                        result = self.measure(
                            self.spec(
                                f"{op}_{size}_{round_ + 1}",
                                servers[size].target,
                                kind,
                                {
                                    "instance_name": "bench-wa",
                                    "phone_base": PHONES[f"{op}_big"] + round_ * 100_000,
                                },
                                seconds=max(1.0, cfg.seconds / 2),
                            ),
                            note=f"{self.report.counts[size]['leads']} leads",
                        )
                        key = (op, size)
                        totals[key] = totals.get(key, 0.0) + result.calls_per_second
            ratios: list[float] = []
            for op in ("ingest", "send_new"):
                small, big = totals.get((op, "small"), 0.0), totals.get((op, "big"), 0.0)
                if small:
                    ratios.append(big / small)
                    self.report.summary[f"scale_{op}"] = f"{big / small:.2f}"
            if ratios:
                self.report.summary["scale_ratio"] = f"{min(ratios):.2f}"
            self.report.plans = database.explain(urls["big"], self.hot_queries(urls["big"]))
        finally:
            for server in servers.values():
                self.stop_server(server)
            if main_server is not None:
                self.watched["server"] = main_server

    def hot_queries(self, url: str) -> list[database.HotQuery]:
        key = phone(PHONES["send_new_big"]).lstrip("+")
        with psycopg.connect(database.libpq(url)) as conn:
            found = conn.execute(
                "SELECT l.id, d.id, l.direction_id FROM leads l "
                "JOIN dialog_analysis d ON d.lead_id = l.id WHERE l.contact_key = %(k)s",
                {"k": key},
            ).fetchone()
            bounds = conn.execute("SELECT min(id), max(id) FROM capi_events_log").fetchone()
        lead_id, dialog_id, direction_id = (
            (int(found[0]), int(found[1]), int(found[2])) if found else (0, 0, 0)
        )
        middle = (int(bounds[0]) + int(bounds[1])) // 2 if bounds and bounds[0] else 0
        return database.hot_queries(
            direction_id=direction_id,
            contact_key=key,
            lead_id=lead_id,
            dialog_id=dialog_id,
            middle_event_id=middle,
        )

    def memory(self, server: ServerProcess, wa: WhatsAppSetup) -> None:
        cfg = self.config
        params: dict[str, Any] = {"instance_name": wa.instance_name}
        ingest = self.measure(
            self.spec(
                "rss_ingest",
                server.target,
                "ingest",
                {**params, "phone_base": PHONES["rss"], "messages_per_dialog": 4},
                max_calls=cfg.rss_messages,
                seconds=cfg.rss_seconds,
            ),
            note="IngestMessage, 4 messages per new dialog",
        )
        after_ingest = rss_mb(server.pid)
        peak = [after_ingest]

        def sample() -> None:
            peak.append(rss_mb(server.pid))

        (burst,) = drive(
            [
                self.spec(
                    "burst",
                    server.target,
                    "ingest",
                    {**params, "phone_base": PHONES["burst"]},
                    concurrency=cfg.burst_calls,
                    max_calls=cfg.burst_calls,
                    seconds=300,
                    warmup_seconds=0,
                    timeout_seconds=120,
                )
            ],
            on_tick=sample,
        )
        time.sleep(5)
        after_burst = rss_mb(server.pid)
        shed = burst.errors.get("RESOURCE_EXHAUSTED", 0)
        note = (
            f"{cfg.burst_calls} calls at once: {burst.ok_total} OK, {shed} RESOURCE_EXHAUSTED "
            f"(load shedding), other errors {sum(burst.errors.values()) - shed} "
            f"{ {k: v for k, v in burst.errors.items() if k != 'RESOURCE_EXHAUSTED'} } "
            f"({burst.first_error[:100]}); took {burst.total_seconds:.1f}s"
        )
        self.report.rows.append(Row("burst", None, None, note))
        say(f"  {'burst':<26} {note}")
        self.report.memory.update(
            {
                "rss_after_ingest_mb": after_ingest,
                "messages_ingested": float(ingest.ok_total),
                "rss_burst_peak_mb": max(peak),
                "rss_after_burst_mb": after_burst,
            }
        )
        self.report.summary["rss_mb"] = f"{max(after_ingest, *peak):.0f}"
        self.report.summary["rss_after_burst_mb"] = f"{after_burst:.0f}"
        say(
            "bench: RSS MiB start {rss_start_mb:.0f}, after {n:.0f} messages "
            "{rss_after_ingest_mb:.0f}, burst peak {rss_burst_peak_mb:.0f}, "
            "after burst {rss_after_burst_mb:.0f}".format(n=ingest.ok_total, **self.report.memory)
        )

    def sqlite(self) -> None:
        url = f"sqlite+aiosqlite:///{self.workdir}/bench.db"
        server = self.start_server("sqlite_server", url)
        self.watched["server"] = server.pid
        try:
            stubs = Stubs.open(server.target)
            wa = whatsapp_direction(stubs, "bench-sqlite")
            stubs.channel.close()
            params: dict[str, Any] = {"instance_name": wa.instance_name}
            self.measure(
                self.spec(
                    "sqlite_ingest", server.target, "ingest", {**params, "phone_base": 9_000_000}
                )
            )
            new = self.measure(
                self.spec(
                    "sqlite_send_new", server.target, "send", {**params, "phone_base": 9_500_000}
                )
            )
            self.measure(
                self.spec(
                    "sqlite_send_dup",
                    server.target,
                    "send",
                    {
                        **params,
                        "phone_base": 9_500_000,
                        "phone_count": max(1, min(new.ok_total, 1000)),
                    },
                )
            )
        finally:
            self.stop_server(server)

    def profile(self, wa: WhatsAppSetup) -> None:
        """Profile ingest, send_new and analyze_unchanged in their own server process each.

        BENCH_PROFILER: `sampler` (default; bench.sampler, inclusive times that survive
        SQLAlchemy's greenlets), `py-spy` (samples from outside the process), or
        `cprofile` (own times only are meaningful there).
        """
        params: dict[str, Any] = {"instance_name": wa.instance_name}
        profiler = os.environ.get("BENCH_PROFILER", "sampler")
        py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which(
            "py-spy"
        )
        if profiler == "py-spy" and py_spy is None:
            self.skip("profile", "BENCH_PROFILER=py-spy but py-spy is not installed")
            return
        RESULTS_DIR.mkdir(exist_ok=True)
        for name, kind in (
            ("ingest", "ingest"),
            ("send_new", "send"),
            ("analyze_unchanged", "analyze"),
        ):
            out = self.workdir / f"profile_{name}.{'prof' if profiler == 'cprofile' else 'json'}"
            args = {
                "cprofile": ["-m", "cProfile", "-o", str(out), "-m", "capi_server", "serve"],
                "py-spy": ["-m", "capi_server", "serve"],
            }.get(profiler, ["-m", "bench.sampler", str(out), "serve"])
            # The in-process profilers see the server's Python frames; under uvloop the
            # loop's own work and its idle time have none (its wait is in C), so they
            # profile the server on asyncio's loop. py-spy samples the default (uvloop).
            loop = {} if profiler == "py-spy" else {"CAPI_EVENT_LOOP": "asyncio"}
            server = self.start_server(f"profile_{name}", self.db_url, args, extra_env=loop)
            self.watched["server"] = server.pid
            spy: subprocess.Popen[bytes] | None = None
            raw = self.workdir / f"profile_{name}.py-spy.txt"
            load = {**params, "phone_base": PHONES[f"profile_{name}"]}
            try:
                if kind == "analyze":  # the dialogs, analysed once, before profiling starts
                    load = {
                        "dialog_ids": self.analyzed_dialogs(
                            server.target, params, load["phone_base"]
                        )[0]
                    }
                if profiler == "sampler":
                    os.kill(server.pid, signal.SIGUSR1)
                if profiler == "py-spy":
                    assert py_spy is not None
                    seconds = str(max(1, int(self.config.seconds)))
                    spy = subprocess.Popen(
                        [
                            *(py_spy, "record", "--pid", str(server.pid), "--format", "raw"),
                            *("--full-filenames", "--rate", str(PY_SPY_RATE)),
                            *("--output", str(raw), "--duration", seconds),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                self.measure(
                    self.spec(
                        f"profiled_{name}",
                        server.target,
                        kind,
                        load,
                    ),
                    note=f"under {profiler} (slower), not a target figure",
                )
                if spy is not None:
                    spy.wait(timeout=60)
            finally:
                if spy is not None and spy.poll() is None:
                    spy.kill()
                self.stop_server(server)
            if profiler == "py-spy" and raw.exists():
                sampler.from_py_spy(raw, out, PY_SPY_RATE)
            if not out.exists():
                self.report.notes.append(f"profile of {name} was not written")
                continue
            text = profile_summary(out) if profiler == "cprofile" else sampler.summarize(out)
            (RESULTS_DIR / f"profile_{name}.txt").write_text(text)
            self.report.profiles[name] = text
            say(f"bench: profile of {name} -> bench/results/profile_{name}.txt")
            say("\n".join(text.splitlines()[:60]))


def batch_sizes(before: dict[str, list[float]], after: dict[str, list[float]]) -> str:
    """ "plan_sends 7.9 calls/batch" for the batches that ran between two scrapes."""
    parts = []
    for batch, (count, total) in sorted(after.items()):
        count -= before.get(batch, [0.0, 0.0])[0]
        total -= before.get(batch, [0.0, 0.0])[1]
        if count > 0:
            parts.append(f"{batch} {total / count:.1f} calls/batch")
    return ", ".join(parts)


def dialogs_of_phones(url: str, base: int, count: int) -> list[int]:
    low, high = phone(base).lstrip("+"), phone(base + count).lstrip("+")
    with psycopg.connect(database.libpq(url)) as conn:
        rows = conn.execute(
            "SELECT d.id FROM dialog_analysis d JOIN leads l ON l.id = d.lead_id "
            "WHERE l.contact_key >= %(low)s AND l.contact_key < %(high)s ORDER BY d.id",
            {"low": low, "high": high},
        ).fetchall()
    return [int(r[0]) for r in rows]


def page_tokens(stubs: Stubs, direction_id: str, pages: int) -> list[str]:
    tokens = [""]
    while len(tokens) < pages:
        answer = stubs.sender.ListEvents(
            spb.ListEventsRequest(direction_id=direction_id, page_size=50, page_token=tokens[-1]),
            timeout=30,
        )
        if not answer.next_page_token:
            break
        tokens.append(answer.next_page_token)
    return tokens


def profile_summary(path: Path, top: int = 30) -> str:
    """Share of own time by library, then the top functions by own and cumulative time."""
    stats = pstats.Stats(str(path))
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values()) or 1.0
    areas: dict[str, float] = {}
    for (filename, _, _), entry in raw.items():
        area = sampler.area_of(filename)
        if area == "other":
            area = "builtins/C" if filename.startswith(("~", "<")) else "other python"
        areas[area] = areas.get(area, 0.0) + entry[2]
    lines = [f"cProfile of {path.name}: {total:.1f}s of own time in the main thread", ""]
    lines.append("Own time by area:")
    for area, seconds in sorted(areas.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {area:<16} {seconds / total:6.1%}  {seconds:7.2f}s")

    by_own = sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]
    lines += ["", f"Top {top} by own time (tottime):"]
    for key, (_, calls, own, cumulative, _) in by_own:
        lines.append(
            f"  {own / total:6.1%} own {own:7.2f}s cum {cumulative:7.2f}s "
            f"{calls:>9} calls  {sampler.short(key)}"
        )
    by_cum = sorted(
        ((k, v) for k, v in raw.items() if "/capi_server/" in k[0] or "sqlalchemy" in k[0]),
        key=lambda kv: -kv[1][3],
    )[:top]
    lines += ["", f"Top {top} capi_server/sqlalchemy functions by cumulative time:"]
    for key, (_, calls, own, cumulative, _) in by_cum:
        lines.append(
            f"  {cumulative / total:6.1%} cum {cumulative:7.2f}s own {own:7.2f}s "
            f"{calls:>9} calls  {sampler.short(key)}"
        )
    return "\n".join(lines) + "\n"


# -- output ------------------------------------------------------------------------------


def cpu_text(cpu: dict[str, float], calls_per_second: float = 0.0) -> str:
    """Cores used by the processes that did work (server, crm_server, echo, fakes, pg);
    for the server under test also its CPU per call, which shows how fast the machine ran
    (the same code's CPU per call moves by 10-40% between runs on a shared machine)."""
    names = {
        "server": "srv",
        "crm_server": "crm",
        "echo": "echo",
        "fakes": "fake",
        "postgres": "pg",
    }
    parts = []
    for key, cores in cpu.items():
        if cores < 0.05:
            continue
        part = f"{names.get(key, key)} {cores:.2f}"
        if key in ("server", "crm_server", "echo") and calls_per_second > 0:
            # Cores over the whole measurement (start-up and warm-up included) per call in
            # the window: a slight underestimate, comparable between scenarios and runs.
            part += f" ({cores / calls_per_second * 1e6:.0f} us/call)"
        parts.append(part)
    return " ".join(parts)


def table(report: Report) -> str:
    lines = [
        "| scenario | calls | calls/s | p50 ms | p99 ms | ratio to echo | CPU cores | notes |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in report.rows:
        r = row.result
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "-"
        if row.echo_around is not None:
            ratio += f" (echo {row.echo_around[0]:.0f}/{row.echo_around[1]:.0f})"
        if r is None:
            lines.append(f"| {row.scenario} | - | - | - | - | {ratio} | - | {row.note} |")
        else:
            lines.append(
                f"| {row.scenario} | {r.calls} | {r.calls_per_second:.1f} | {r.p50_ms:.1f} | "
                f"{r.p99_ms:.1f} | {ratio} | {cpu_text(row.cpu, r.calls_per_second)} | {row.note} |"
            )
    return "\n".join(lines)


def targets(report: Report) -> str:
    s = report.summary

    def check(key: str, goal: float, *, at_most: bool = False) -> str:
        if key not in s:
            return "not measured"
        value = float(s[key])
        met = value <= goal if at_most else value >= goal
        return f"{'met' if met else 'NOT met'} ({value:g})"

    crm = report.crm
    within = "not measured"
    if crm:
        within = (
            f"{'met' if crm['seconds_to_last_event'] <= crm['amocrm_limit_seconds'] else 'NOT met'}"
            f" ({crm['seconds_to_last_event']:.1f}s of service time vs "
            f"{crm['amocrm_limit_seconds']:.0f}s imposed by amoCRM's 7 req/s)"
        )
    mem = report.memory
    returns = "not measured"
    if "rss_after_burst_mb" in mem:
        base = mem.get("rss_after_ingest_mb", mem["rss_start_mb"])
        ok = mem["rss_after_burst_mb"] <= base * 1.15 + 10
        returns = (
            f"{'met' if ok else 'NOT met'} ({mem['rss_after_burst_mb']:.0f} MiB after vs "
            f"{base:.0f} MiB before the burst)"
        )
    rows = [
        ("SendConversion already sent >= 0.5", check("send_dup", 0.5)),
        ("AnalyzeDialog unchanged >= 0.5", check("analyze_unchanged", 0.5)),
        ("AnalyzeDialog unchanged calls no LLM", check("analyze_llm_calls", 0, at_most=True)),
        ("IngestMessage >= 0.4", check("ingest", 0.4)),
        ("SendConversion new events >= 0.25", check("send_new", 0.25)),
        ("CRM mass update: Graph requests <= 2", check("crm_mass_requests", 2, at_most=True)),
        ("CRM mass update within the CRM's rate limit", within),
        ("Scale: big vs 1,000-row tables >= 0.8 (ingest and send_new)", check("scale_ratio", 0.8)),
        ("RSS < 250 MB after ingest and under burst", check("rss_mb", 250, at_most=True)),
        ("RSS returns near base after the burst", returns),
    ]
    return "\n".join(["| target | result |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def results_markdown(config: BenchConfig, report: Report) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"Run {when} on {machine()}; BENCH_SECONDS={config.seconds:g}, "
        f"{config.concurrency} calls in flight, PostgreSQL.",
        "",
        table(report),
        "",
        "Targets (ratios to the echo baseline of the same run):",
        "",
        targets(report),
        "",
    ]
    if report.memory:
        parts += [
            "Memory (server VmRSS, MiB): "
            + ", ".join(f"{k} {v:.0f}" for k, v in report.memory.items()),
            "",
        ]
    if report.counts:
        parts += [f"Table sizes: {json.dumps(report.counts)}", ""]
    if report.notes:
        parts += ["Notes:", *(f"- {n}" for n in report.notes), ""]
    if report.plans:
        size = report.counts.get("big", {}).get("leads", 0)  # the scale step's big database
        parts += ["### Query plans", "", f"EXPLAIN (ANALYZE, BUFFERS) with {size} leads.", ""]
        for query, plan in report.plans:
            parts += [f"**{query.title}** ({query.where_used})", "", "```", plan, "```", ""]
    return "\n".join(parts)


def update_readme(markdown: str) -> None:
    if not README.exists():
        return
    text = README.read_text()
    if README_START not in text or README_END not in text:
        return
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    README.write_text(f"{head}{README_START}\n{markdown}\n{README_END}{tail}")


def summary_line(report: Report) -> str:
    order = [
        "ingest",
        "send_new",
        "send_dup",
        "analyze_unchanged",
        "analyze_llm_calls",
        "llm_delay_send_dup",
        "llm_nonblocking",
        "list_events",
        "check_crm",
        "crm_mass_requests",
        "crm_mass_s",
        "scale_ratio",
        "rss_mb",
        "rss_after_burst_mb",
        "echo_cps",
    ]
    fields = [f"{k}={report.summary[k]}" for k in order if k in report.summary]
    return "bench: " + " ".join(fields)


def main() -> int:
    config = BenchConfig.from_env()
    workdir = Path(tempfile.mkdtemp(prefix="capi-bench-"))
    bench = Bench(config, workdir)
    failure: BaseException | None = None
    try:
        bench.run()
    except Exception as exc:  # anything before or around the steps: the bench did not run
        traceback.print_exc()
        failure = exc
    finally:
        bench.close()
        if bench.db_url:
            try:
                database.drop_database(bench.db_url)
            except psycopg.Error as exc:
                say(f"bench: could not drop the database: {exc}")
    if failure is not None:
        say(f"bench: could not run: {type(failure).__name__}: {failure} (logs in {workdir})")
        return 2
    markdown = results_markdown(config, bench.report)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "latest.md").write_text(markdown)
    if config.write_readme:
        update_readme(markdown)
    say("")
    say(table(bench.report))
    say("")
    say(targets(bench.report))
    say("bench: results in bench/results/latest.md (BENCH_KEEP_LOGS=1 keeps server logs)")
    ran = any(row.result for row in bench.report.rows)
    if _env_flag("BENCH_KEEP_LOGS", False) or not ran:
        say(f"bench: server logs in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if not ran:
        say("bench: no scenario ran")
    say(summary_line(bench.report))
    return 0 if ran else 2


if __name__ == "__main__":
    sys.exit(main())
