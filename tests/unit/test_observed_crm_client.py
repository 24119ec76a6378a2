"""CRM calls are counted by outcome in capi_crm_calls_total."""

from __future__ import annotations

import pytest

from capi_server.adapters import metrics
from capi_server.adapters.crm.base import CrmError
from capi_server.adapters.crm.observed import ObservedCrmClient
from capi_server.domain.crm import CrmFieldInfo, EntityType


class _Inner:
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    async def list_fields(self, entity_type: EntityType) -> list[CrmFieldInfo]:
        if self.fail:
            raise CrmError("amoCRM token rejected", "auth")
        return [CrmFieldInfo("1", "Status", "select")]


def _count(outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "capi_crm_calls_total", {"crm_type": "amocrm", "outcome": outcome}
    )
    return value or 0.0


async def test_calls_are_counted_by_outcome() -> None:
    ok_before, auth_before = _count("ok"), _count("auth")
    good = ObservedCrmClient(_Inner(fail=False), "amocrm")  # type: ignore[arg-type]
    bad = ObservedCrmClient(_Inner(fail=True), "amocrm")  # type: ignore[arg-type]
    assert [f.field_id for f in await good.list_fields(EntityType.DEAL)] == ["1"]
    with pytest.raises(CrmError):
        await bad.list_fields(EntityType.DEAL)
    assert _count("ok") == ok_before + 1
    assert _count("auth") == auth_before + 1
