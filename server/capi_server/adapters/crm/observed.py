"""A CrmClient that counts every call by outcome (capi_crm_calls_total)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from capi_server.adapters import metrics
from capi_server.adapters.crm.base import CrmClient, CrmError
from capi_server.domain.crm import CrmEntity, CrmFieldInfo, EntityType

T = TypeVar("T")


class ObservedCrmClient:
    def __init__(self, inner: CrmClient, crm_type: str) -> None:
        self._inner = inner
        self._crm_type = crm_type

    async def _observe(self, call: Awaitable[T]) -> T:
        try:
            result = await call
        except CrmError as exc:
            metrics.observe_crm_call(self._crm_type, exc.kind)
            raise
        metrics.observe_crm_call(self._crm_type, "ok")
        return result

    async def get_entity(self, entity_type: EntityType, entity_id: str) -> CrmEntity:
        return await self._observe(self._inner.get_entity(entity_type, entity_id))

    async def list_fields(self, entity_type: EntityType) -> list[CrmFieldInfo]:
        return await self._observe(self._inner.list_fields(entity_type))

    async def list_changed_since(
        self, entity_type: EntityType, since_unix: int, limit: int
    ) -> list[str]:
        return await self._observe(self._inner.list_changed_since(entity_type, since_unix, limit))

    async def aclose(self) -> None:
        await self._inner.aclose()
