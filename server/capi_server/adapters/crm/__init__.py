"""CRM REST adapters (amoCRM/Kommo v4, Bitrix24) behind the `CrmClient` port."""

from capi_server.adapters.crm.amocrm import AmoCrmClient, amocrm_base_url
from capi_server.adapters.crm.base import (
    AsyncRateLimiter,
    CrmClient,
    CrmError,
    CrmErrorKind,
    RetryPolicy,
)
from capi_server.adapters.crm.bitrix24 import Bitrix24Client
from capi_server.domain.crm import CrmFieldInfo

__all__ = [
    "AmoCrmClient",
    "AsyncRateLimiter",
    "Bitrix24Client",
    "CrmClient",
    "CrmError",
    "CrmErrorKind",
    "CrmFieldInfo",
    "RetryPolicy",
    "amocrm_base_url",
]
