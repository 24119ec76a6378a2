"""Configuration from the environment (names are contract: ARCHITECTURE.md section 6)."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the server. Read once at start-up by `Settings()`."""

    model_config = SettingsConfigDict(env_prefix="CAPI_", extra="ignore", frozen=True)

    listen: str = "127.0.0.1:50051"
    database_url: str = "sqlite+aiosqlite:///./capi.db"
    meta_graph_url: str = "https://graph.facebook.com"
    meta_api_version: str = "v25.0"
    meta_timeout_seconds: float = 1.5
    # The openai SDK's own variable names, without our prefix.
    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_API_KEY")
    )
    openai_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_BASE_URL")
    )
    llm_model: str = "gpt-4o-mini"
    llm_timeout_seconds: float = 20.0
    llm_token_budget: int = 3000
    auth_tokens: SecretStr = SecretStr("")
    dry_run: bool = False
    encryption_keys: SecretStr = SecretStr("")
    insecure_dev: bool = False
    metrics_listen: str = ""
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    tls_cert_file: str = ""
    tls_key_file: str = ""
    shutdown_grace_seconds: float = 10.0
    # The event loop: "auto" is uvloop when it is installed (it is with the server extra,
    # except on Windows), else asyncio's own; "uvloop" refuses to start without it.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    migrate_on_start: bool = False
    # Retry queue: first retry after retry_base_seconds, doubling up to retry_max_seconds,
    # with +-20% jitter; events close as expired this long before Meta's 7-day limit.
    retry_worker_enabled: bool = True
    retry_poll_seconds: float = 2.0
    retry_base_seconds: float = 5.0
    retry_max_seconds: float = 3600.0
    retry_batch_size: int = 500
    expiry_margin_seconds: int = 3600
    # A claimed event whose sender died is resent (same event_id) after this lease.
    send_lease_seconds: float = 60.0
    # Load shedding: calls beyond this many in flight are refused at once with
    # RESOURCE_EXHAUSTED (clients back off) instead of queueing and growing memory.
    max_concurrent_rpcs: int = 256
    # Group commit: under concurrent load a batch of IngestMessage, SendConversion or
    # AnalyzeDialog work waits this long for more calls before it starts (0: never).
    batch_linger_ms: float = Field(default=2.0, ge=0.0, le=100.0)
    # SendConversion: the next claim batch waits for the previous batch's Graph request
    # and record to finish, at most this long (0: never waits).
    send_pacing_ms: float = Field(default=20.0, ge=0.0, le=1000.0)
    # Every this many seconds the memory calls freed is handed back to the OS (glibc
    # malloc_trim), so RSS returns near its base after a burst (0: never).
    memory_trim_seconds: float = Field(default=2.0, ge=0.0)
    partner_agent: str = ""
    # CRM source: client-side rate limits per CRM account, read concurrency, reconciliation
    # (the periodic job runs only for connections with reconcile_interval_seconds > 0).
    crm_amocrm_rate_per_second: float = 7.0
    crm_bitrix24_rate_per_second: float = 2.0
    crm_concurrency: int = 8
    crm_reconcile_max_entities: int = 500
    crm_reconcile_poll_seconds: float = 30.0
    crm_reconcile_enabled: bool = True
    settings_cache_seconds: float = 2.0
    # Diagnose warns when fewer of a WhatsApp direction's sent events carry a ctwa_clid.
    match_quality_ctwa_warn_share: float = 0.5

    def auth_token_map(self) -> dict[str, str]:
        """`caller:token,...` -> {token: caller}."""
        pairs: dict[str, str] = {}
        for item in self.auth_tokens.get_secret_value().split(","):
            item = item.strip()
            if not item:
                continue
            caller, sep, token = item.partition(":")
            if not sep or not caller or not token:
                raise ValueError("CAPI_AUTH_TOKENS must be comma-separated caller:token pairs")
            pairs[token] = caller
        return pairs
