"""QualificationService methods of the CRM source (mixed into QualificationServicer)."""

from __future__ import annotations

import grpc

from capi.v1 import qualification_service_pb2 as pb
from capi_server.services.crm import CrmService

Ctx = grpc.aio.ServicerContext


class CrmMethods:
    _crm: CrmService

    async def CheckCrmFields(
        self,
        request: pb.CheckCrmFieldsRequest,
        context: Ctx[pb.CheckCrmFieldsRequest, pb.CheckCrmFieldsResponse],
    ) -> pb.CheckCrmFieldsResponse:
        raise NotImplementedError

    async def HandleCrmWebhook(
        self,
        request: pb.HandleCrmWebhookRequest,
        context: Ctx[pb.HandleCrmWebhookRequest, pb.HandleCrmWebhookResponse],
    ) -> pb.HandleCrmWebhookResponse:
        raise NotImplementedError

    async def ReconcileCrm(
        self,
        request: pb.ReconcileCrmRequest,
        context: Ctx[pb.ReconcileCrmRequest, pb.ReconcileCrmResponse],
    ) -> pb.ReconcileCrmResponse:
        raise NotImplementedError
