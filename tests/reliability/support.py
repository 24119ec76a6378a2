"""Shared pieces of the reliability suite: real server processes, databases, data, certs."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine, make_url

from capi.v1 import capi_sender_service_pb2 as spb
from capi.v1 import (
    capi_sender_service_pb2_grpc,
    qualification_service_pb2_grpc,
    settings_service_pb2_grpc,
)
from capi.v1 import resources_pb2 as res
from capi.v1 import settings_service_pb2 as setpb
from capi_server.domain.levels import Level
from tests.conftest import _migrate, create_pg_database, drop_pg_database, unique

T = TypeVar("T")

# Default event names (seed preset) -> level, to read events at the fake Graph server.
EVENT_LEVELS = {"Lead": 1, "CompleteRegistration": 2, "Schedule": 3}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- databases ----------------------------------------------------------------------------


@contextmanager
def fresh_pg_database(prefix: str = "capi_rel") -> Iterator[str]:
    """A new migrated PostgreSQL database for one test, dropped afterwards."""
    url = create_pg_database(prefix)
    try:
        # _migrate runs its own event loop; async tests already run one in this thread.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(_migrate, url).result()
        yield url
    finally:
        drop_pg_database(url)


def terminate_backends(url: str) -> int:
    """pg_terminate_backend on every connection to the test database but this one."""
    parsed = make_url(url)
    libpq = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (parsed.database,),
        ).fetchall()
    return len(rows)


def sync_url(url: str) -> str:
    """The synchronous driver URL of an async SQLAlchemy URL (for raw reads in tests)."""
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite"):
        parsed = parsed.set(drivername="sqlite")
    return parsed.render_as_string(hide_password=False)


@contextmanager
def sync_engine(url: str) -> Iterator[Engine]:
    engine = create_engine(sync_url(url))
    try:
        yield engine
    finally:
        engine.dispose()


def table_counts(engine: Engine) -> dict[str, int]:
    """Row count of every table except Alembic's bookkeeping."""
    names = [n for n in inspect(engine).get_table_names() if n != "alembic_version"]
    with engine.connect() as conn:
        return {
            name: int(conn.execute(text(f'SELECT count(*) FROM "{name}"')).scalar_one())
            for name in sorted(names)
        }


def dump_tables(engine: Engine) -> str:
    """Every row of every table as text: what an attacker with a database dump reads."""
    parts: list[str] = []
    with engine.connect() as conn:
        for name in inspect(engine).get_table_names():
            for row in conn.execute(text(f'SELECT * FROM "{name}"')):
                parts.append(f"{name}: {tuple(row)!r}")
    return "\n".join(parts)


# -- the real server process --------------------------------------------------------------


@dataclass
class ServerProcess:
    """`python -m capi_server serve` in a child process, its output in a file."""

    env: dict[str, str]
    log_path: Path
    target: str = ""
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> ServerProcess:
        if not self.target:
            self.target = f"127.0.0.1:{free_port()}"
        environment = {**os.environ, "CAPI_LISTEN": self.target, **self.env}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "capi_server", "serve"],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, no chance to finish anything."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def restart(self, **env: str) -> ServerProcess:
        self.env.update(env)
        self.restarts += 1
        return self.start()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def rss_mb(self) -> float:
        """Resident memory of the server process (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def wait_serving(self, within_seconds: float = 30.0) -> None:
        await wait_serving(self.target, within_seconds, alive=self.alive)


def server_env(database_url: str, graph_url: str, **extra: str) -> dict[str, str]:
    env = {
        "CAPI_DATABASE_URL": database_url,
        "CAPI_INSECURE_DEV": "true",
        "CAPI_META_GRAPH_URL": graph_url,
        "CAPI_RETRY_WORKER_ENABLED": "false",
        "CAPI_SETTINGS_CACHE_SECONDS": "0",
        "CAPI_LOG_LEVEL": "WARNING",
    }
    env.update(extra)
    return env


async def health_status(target: str, rpc_seconds: float = 2.0) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=rpc_seconds)
        return int(resp.status)


async def wait_serving(
    target: str, within_seconds: float = 30.0, alive: Callable[[], bool] | None = None
) -> None:
    deadline = time.monotonic() + within_seconds
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise AssertionError("server process exited before serving")
        try:
            if await health_status(target, 1.0) == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"server at {target} did not become SERVING")


# -- clients and data ---------------------------------------------------------------------


@dataclass
class Client:
    """Async stubs on one channel (optionally with a bearer token on every call)."""

    channel: grpc.aio.Channel
    settings: settings_service_pb2_grpc.SettingsServiceAsyncStub = field(init=False)
    sender: capi_sender_service_pb2_grpc.CapiSenderServiceAsyncStub = field(init=False)
    qualification: qualification_service_pb2_grpc.QualificationServiceAsyncStub = field(init=False)

    def __post_init__(self) -> None:
        self.settings = settings_service_pb2_grpc.SettingsServiceStub(self.channel)
        self.sender = capi_sender_service_pb2_grpc.CapiSenderServiceStub(self.channel)
        self.qualification = qualification_service_pb2_grpc.QualificationServiceStub(self.channel)

    @classmethod
    def insecure(cls, target: str) -> Client:
        return cls(grpc.aio.insecure_channel(target))

    async def close(self) -> None:
        await self.channel.close()


@dataclass(frozen=True, slots=True)
class Direction:
    account_id: str
    ad_account_id: str
    direction_id: str
    instance_name: str
    pixel_id: str


async def create_direction(
    settings: settings_service_pb2_grpc.SettingsServiceAsyncStub,
    *,
    user_token: str = "EAAB-user-token-secret",
    ad_token: str | None = None,
    pixel_id: str = "1234567890",
    prompt: str = "",
    metadata: Sequence[tuple[str, str]] = (),
) -> Direction:
    """A user account (+ ad account) and an enabled WhatsApp direction, through the RPCs."""
    account = await settings.CreateUserAccount(
        setpb.CreateUserAccountRequest(
            user_account=res.UserAccount(name="Acme", access_token=user_token, default_region="KZ")
        ),
        metadata=metadata,
    )
    ad_account_id = ""
    if ad_token is not None:
        ad = await settings.CreateAdAccount(
            setpb.CreateAdAccountRequest(
                ad_account=res.AdAccount(
                    user_account_id=account.user_account.id, name="Ads", access_token=ad_token
                )
            ),
            metadata=metadata,
        )
        ad_account_id = ad.ad_account.id
    instance = unique("inst")
    created = await settings.CreateDirection(
        setpb.CreateDirectionRequest(
            direction=res.Direction(
                user_account_id=account.user_account.id,
                ad_account_id=ad_account_id,
                name="Direction",
                instance_name=instance,
                pixel_id=pixel_id,
                qualification_prompt=prompt,
                capi=res.CapiSettings(enabled=True, source=res.CAPI_SOURCE_WHATSAPP),
            )
        ),
        metadata=metadata,
    )
    return Direction(
        account.user_account.id, ad_account_id, created.direction.id, instance, pixel_id
    )


def phone_of(index: int, prefix: str = "7701") -> str:
    """A distinct valid KZ mobile number per index: +7 701 NNN NN NN."""
    return f"+{prefix}{index:07d}"


def phone_hash(phone: str) -> str:
    digits = "".join(c for c in phone if c.isdigit())
    return hashlib.sha256(digits.encode()).hexdigest()


def send_request(direction: Direction, phone: str, level: int) -> spb.SendConversionRequest:
    return spb.SendConversionRequest(
        instance_name=direction.instance_name,
        contact_phone=phone,
        level=res.Level.ValueType(level),
    )


async def bounded_gather(
    factories: Sequence[Callable[[], Awaitable[T]]], limit: int
) -> list[T | BaseException]:
    """Run the coroutines with at most `limit` at once; exceptions are returned, not raised."""
    semaphore = asyncio.Semaphore(limit)

    async def run(factory: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await factory()

    return await asyncio.gather(*(run(f) for f in factories), return_exceptions=True)


async def send_one(
    client: Client, request: spb.SendConversionRequest
) -> spb.SendConversionResponse:
    return await client.sender.SendConversion(request, timeout=30)


async def send_all(
    calls: Sequence[tuple[Client, spb.SendConversionRequest]], limit: int
) -> list[spb.SendConversionResponse | BaseException]:
    """SendConversion for every (client, request), at most `limit` at once."""
    return await bounded_gather([functools.partial(send_one, c, r) for c, r in calls], limit)


def expected_levels(calls: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
    """(phone hash, level) pairs a list of (phone, level) SendConversion calls must deliver.

    A call for level L sends every unsent lower level too.
    """
    expected: set[tuple[str, int]] = set()
    for phone, level in calls:
        for lvl in Level(level).with_lower():
            expected.add((phone_hash(phone), int(lvl)))
    return expected


@dataclass
class GraphTally:
    """What the fake Graph server received, per (phone hash, level)."""

    event_ids: dict[tuple[str, int], set[str]]
    deliveries: dict[str, int]

    @property
    def resends(self) -> int:
        return sum(n - 1 for n in self.deliveries.values())

    @property
    def conflicting(self) -> dict[tuple[str, int], set[str]]:
        """(dialog, level) pairs that reached Graph under more than one event_id."""
        return {key: ids for key, ids in self.event_ids.items() if len(ids) > 1}


def tally_events(events: Sequence[dict[str, Any]]) -> GraphTally:
    event_ids: dict[tuple[str, int], set[str]] = defaultdict(set)
    deliveries: dict[str, int] = defaultdict(int)
    for event in events:
        hashes_ = event.get("user_data", {}).get("ph") or [""]
        key = (str(hashes_[0]), EVENT_LEVELS[str(event["event_name"])])
        event_ids[key].add(str(event["event_id"]))
        deliveries[str(event["event_id"])] += 1
    return GraphTally(dict(event_ids), dict(deliveries))


def event_log_statuses(engine: Engine) -> dict[tuple[int, int], str]:
    """(dialog_id, level) -> status of its newest non-skipped capi_events_log row."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT dialog_id, level, status FROM capi_events_log "
                "WHERE status <> 'skipped' ORDER BY id"
            )
        ).all()
    return {(int(d), int(lvl)): str(s) for d, lvl, s in rows}


# -- TLS ----------------------------------------------------------------------------------


def self_signed_certificate(directory: Path) -> tuple[Path, Path, bytes]:
    """A fresh key and self-signed certificate for CN=localhost, SAN localhost/127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return cert_path, key_path, cert_pem
