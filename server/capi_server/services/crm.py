"""CRM source use cases: CheckCrmFields, HandleCrmWebhook, ReconcileCrm, ListCrmFields."""

from __future__ import annotations

from capi_server.adapters.db.database import Database
from capi_server.adapters.db.secrets import TokenCipher
from capi_server.config import Settings
from capi_server.domain.crm import CrmFieldInfo
from capi_server.services.sender import SenderService


class CrmService:
    def __init__(
        self, settings: Settings, db: Database, cipher: TokenCipher, sender: SenderService
    ) -> None:
        self.settings = settings
        self.db = db
        self.cipher = cipher
        self.sender = sender

    async def list_fields(self, connection_id: int, entity_type: str) -> list[CrmFieldInfo]:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None
