"""Composition root: builds every adapter and service from Settings (overridable in tests)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from capi_server.adapters.db.database import Database, create_engine, migrate
from capi_server.adapters.db.secrets import PlaintextCipher, TokenCipher
from capi_server.adapters.heap import HeapTrimmer
from capi_server.adapters.meta_graph import MetaGraphClient
from capi_server.adapters.metrics import MetricsEndpoint, QueueSnapshot, QueueSource
from capi_server.config import Settings
from capi_server.services.crm import CrmService
from capi_server.services.diagnostics import DiagnosticsConfig, DiagnosticsService
from capi_server.services.hot_cache import HotCache
from capi_server.services.sender import RetryWorker, SenderConfig, SenderService
from capi_server.services.settings import SettingsService
from capi_server.services.whatsapp import QualificationLlm, WhatsAppService

log = logging.getLogger("capi_server")


class StartupError(RuntimeError):
    """The server refuses to start; the message says why and what to set."""


def build_cipher(settings: Settings) -> TokenCipher:
    if settings.encryption_keys.get_secret_value().strip():
        from capi_server.adapters.db.fernet import FernetCipher

        try:
            return FernetCipher.from_keys(settings.encryption_keys.get_secret_value())
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
    if not settings.insecure_dev:
        raise StartupError(
            "CAPI_ENCRYPTION_KEYS is not set: tokens would be stored in clear. Set it to one "
            "or more comma-separated Fernet keys, or set CAPI_INSECURE_DEV=true for local "
            "development only."
        )
    log.warning(
        "tokens are stored WITHOUT encryption (CAPI_INSECURE_DEV=true); "
        "set CAPI_ENCRYPTION_KEYS in production"
    )
    return PlaintextCipher()


@dataclass
class App:
    settings: Settings
    db: Database
    cipher: TokenCipher
    settings_service: SettingsService
    graph: MetaGraphClient
    sender: SenderService
    crm: CrmService
    whatsapp: WhatsAppService
    llm: Any = None
    retry_worker: RetryWorker | None = None
    closers: list[Any] = field(default_factory=list)
    diagnostics: DiagnosticsService | None = None
    metrics_endpoint: MetricsEndpoint | None = None
    heap_trimmer: HeapTrimmer | None = None

    def start_background(self) -> None:
        if self.settings.retry_worker_enabled and self.retry_worker is None:
            self.retry_worker = RetryWorker(self.sender, self.settings.retry_poll_seconds)
            self.retry_worker.start()
        if self.settings.crm_reconcile_enabled:
            self.crm.start()
        if self.settings.memory_trim_seconds > 0 and self.heap_trimmer is None:
            self.heap_trimmer = HeapTrimmer(self.settings.memory_trim_seconds)
            self.heap_trimmer.start()
        if self.settings.metrics_listen and self.metrics_endpoint is None:
            self.metrics_endpoint = MetricsEndpoint.start(
                self.settings.metrics_listen, self._queue_source()
            )

    def _queue_source(self) -> QueueSource | None:
        """The retry-queue reader for scrapes: they run on the endpoint's thread, the
        database on this event loop, so the query is handed to the loop and waited for."""
        diagnostics = self.diagnostics
        if diagnostics is None:
            return None
        loop = asyncio.get_running_loop()

        def read() -> QueueSnapshot | None:
            if loop.is_closed():
                return None
            future = asyncio.run_coroutine_threadsafe(diagnostics.queue_snapshot(), loop)
            return future.result(timeout=2.0)

        return read

    async def aclose(self) -> None:
        if self.heap_trimmer is not None:
            await self.heap_trimmer.stop()
            self.heap_trimmer = None
        if self.metrics_endpoint is not None:
            # In a thread: shutdown() waits for a scrape in progress, which may be waiting
            # for this loop (the retry-queue query).
            await asyncio.to_thread(self.metrics_endpoint.stop)
            self.metrics_endpoint = None
        if self.retry_worker is not None:
            await self.retry_worker.stop()
        await self.whatsapp.aclose()
        await self.sender.aclose()
        for closer in reversed(self.closers):
            await closer()
        await self.crm.aclose()
        if self.llm is not None:
            await self.llm.aclose()
        await self.graph.aclose()
        await self.db.dispose()


async def build_app(settings: Settings, *, run_migrations: bool | None = None) -> App:
    cipher = build_cipher(settings)
    db = Database(create_engine(settings.database_url))
    if run_migrations if run_migrations is not None else settings.migrate_on_start:
        await migrate(db.engine)
    graph = MetaGraphClient(
        settings.meta_graph_url,
        settings.meta_api_version,
        read_timeout_seconds=settings.meta_timeout_seconds,
    )
    cache = HotCache(cipher, settings.settings_cache_seconds)
    sender = SenderService(
        db,
        cipher,
        graph,
        SenderConfig(
            dry_run=settings.dry_run,
            partner_agent=settings.partner_agent or None,
            retry_base_seconds=settings.retry_base_seconds,
            retry_max_seconds=settings.retry_max_seconds,
            expiry_margin_seconds=settings.expiry_margin_seconds,
            retry_batch_size=settings.retry_batch_size,
            batch_linger_seconds=settings.batch_linger_ms / 1000,
            pacing_seconds=settings.send_pacing_ms / 1000,
            lease_seconds=settings.send_lease_seconds,
        ),
        cache=cache,
    )
    llm = build_llm(settings)
    return App(
        settings=settings,
        db=db,
        cipher=cipher,
        settings_service=SettingsService(db, cipher, on_change=cache.forget_directions),
        graph=graph,
        sender=sender,
        crm=CrmService(settings, db, cipher, sender),
        whatsapp=WhatsAppService(
            db,
            sender,
            llm,
            dry_run=settings.dry_run,
            batch_linger_seconds=settings.batch_linger_ms / 1000,
        ),
        llm=llm,
        diagnostics=DiagnosticsService(
            db,
            cipher,
            graph,
            DiagnosticsConfig(
                dry_run=settings.dry_run,
                llm_model=settings.llm_model if llm is not None else None,
                match_quality_ctwa_warn_share=settings.match_quality_ctwa_warn_share,
            ),
        ),
    )


def build_llm(settings: Settings) -> QualificationLlm | None:
    """The OpenAI-compatible LLM, or None without OPENAI_API_KEY (level 1 still works)."""
    if settings.openai_api_key is None or not settings.openai_api_key.get_secret_value():
        log.warning("OPENAI_API_KEY is not set: levels 2-3 are skipped (LLM not configured)")
        return None
    from capi_server.adapters.llm import OpenAiQualificationLlm

    return OpenAiQualificationLlm(
        api_key=settings.openai_api_key.get_secret_value(),
        base_url=settings.openai_base_url,
        model=settings.llm_model,
        timeout=settings.llm_timeout_seconds,
        token_budget=settings.llm_token_budget,
    )
