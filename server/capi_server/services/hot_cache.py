"""Process-local caches for the hot paths (IngestMessage, SendConversion, AnalyzeDialog).

Two kinds of entries, with different rules:
- direction snapshots (settings, region, token) live `ttl_seconds` (CAPI_SETTINGS_CACHE_SECONDS,
  default 2 s) and are dropped at once when this process changes settings; another
  replica's change is seen within the TTL;
- facts that never change once true are kept until evicted (LRU): which lead and dialog a
  (direction, contact) has, and that a level of a dialog was sent (with its event_id).
  They let an already-sent level be answered without touching the database.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from capi_server.adapters.db import dialogs_repo
from capi_server.adapters.db.dialogs_repo import DialogKeys
from capi_server.adapters.db.secrets import TokenCipher
from capi_server.adapters.db.settings_repo import direction_from_row
from capi_server.domain.directions import Direction
from capi_server.domain.errors import DomainError, FailedPrecondition
from capi_server.domain.levels import Level

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class DirectionSnapshot:
    direction: Direction
    direction_id: int
    default_region: str | None
    access_token: str | None
    token_source: str
    # The stored token exists but cannot be decrypted: sending fails with this error,
    # while ingestion and analysis, which need no token, go on.
    token_error: DomainError | None = None


@dataclass(frozen=True, slots=True)
class SentLevel:
    event_id: str
    sent_at: datetime | None


class _Lru(Generic[K, V]):
    def __init__(self, max_entries: int) -> None:
        self._items: OrderedDict[K, V] = OrderedDict()
        self._max = max_entries

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._max:
            self._items.popitem(last=False)


class HotCache:
    def __init__(
        self,
        cipher: TokenCipher,
        ttl_seconds: float,
        *,
        max_entries: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cipher = cipher
        self.ttl = ttl_seconds
        self.clock = clock
        self._directions: dict[int, tuple[float, DirectionSnapshot]] = {}
        self._instances: dict[str, tuple[float, int]] = {}
        self._dialogs: _Lru[tuple[int, str], DialogKeys] = _Lru(max_entries)
        self._sent: _Lru[int, tuple[int, dict[Level, SentLevel]]] = _Lru(max_entries)

    # -- directions (TTL) ---------------------------------------------------------------

    def forget_directions(self) -> None:
        self._directions.clear()
        self._instances.clear()

    def cached_direction(
        self, direction_id: int | None = None, instance_name: str | None = None
    ) -> DirectionSnapshot | None:
        """The direction's snapshot while it is fresh, else None (read it with a session)."""
        now = self.clock()
        if direction_id is None and instance_name is not None:
            cached_id = self._instances.get(instance_name)
            if cached_id and cached_id[0] > now:
                direction_id = cached_id[1]
        cached = self._directions.get(direction_id) if direction_id is not None else None
        if cached and cached[0] > now:
            return cached[1]
        return None

    async def direction(
        self,
        session: Any,
        *,
        direction_id: int | None = None,
        instance_name: str | None = None,
    ) -> DirectionSnapshot:
        """The direction by id or instance; NOT_FOUND when it does not exist."""
        cached = self.cached_direction(direction_id, instance_name)
        if cached is not None:
            return cached
        now = self.clock()
        if direction_id is not None:
            row = await dialogs_repo.direction_by_id(session, direction_id)
        else:
            assert instance_name is not None
            row = await dialogs_repo.direction_by_instance(session, instance_name)
        region = await dialogs_repo.default_region(session, row.user_account_id)
        token_error: DomainError | None = None
        try:
            token, source = await dialogs_repo.access_token_for(session, row, self.cipher)
        except FailedPrecondition as exc:
            token, source, token_error = None, "undecryptable", exc
        snapshot = DirectionSnapshot(
            direction_from_row(row), row.id, region, token, source, token_error
        )
        if self.ttl > 0:
            expires = now + self.ttl
            self._directions[row.id] = (expires, snapshot)
            if row.instance_name:
                self._instances[row.instance_name] = (expires, row.id)
        return snapshot

    # -- immutable facts (LRU) ----------------------------------------------------------

    def dialog_keys(self, direction_id: int, contact_key: str) -> DialogKeys | None:
        return self._dialogs.get((direction_id, contact_key))

    def remember_dialog(self, contact_key: str, keys: DialogKeys) -> None:
        self._dialogs.put((keys.direction_id, contact_key), keys)

    def sent_levels(self, dialog_id: int) -> tuple[int, dict[Level, SentLevel]] | None:
        """(direction_id, {level: SentLevel}) for the levels known to be sent."""
        return self._sent.get(dialog_id)

    def remember_sent(
        self,
        dialog_id: int,
        direction_id: int,
        level: Level,
        event_id: str,
        sent_at: datetime | None,
    ) -> None:
        entry = self._sent.get(dialog_id)
        levels = dict(entry[1]) if entry else {}
        levels[level] = SentLevel(event_id, sent_at)
        self._sent.put(dialog_id, (direction_id, levels))
