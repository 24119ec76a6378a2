"""QualificationService: WhatsApp methods here, CRM methods in crm_methods.CrmMethods."""

from __future__ import annotations

import grpc

from capi.v1 import qualification_service_pb2 as pb
from capi.v1 import qualification_service_pb2_grpc as pb_grpc
from capi_server.rpc.crm_methods import CrmMethods
from capi_server.services.crm import CrmService

Ctx = grpc.aio.ServicerContext


class QualificationServicer(CrmMethods, pb_grpc.QualificationServiceServicer):
    def __init__(self, crm: CrmService) -> None:
        self._crm = crm

    async def IngestMessage(
        self,
        request: pb.IngestMessageRequest,
        context: Ctx[pb.IngestMessageRequest, pb.IngestMessageResponse],
    ) -> pb.IngestMessageResponse:
        raise NotImplementedError

    async def AnalyzeDialog(
        self,
        request: pb.AnalyzeDialogRequest,
        context: Ctx[pb.AnalyzeDialogRequest, pb.AnalyzeDialogResponse],
    ) -> pb.AnalyzeDialogResponse:
        raise NotImplementedError

    async def ReviewDialogLevel(
        self,
        request: pb.ReviewDialogLevelRequest,
        context: Ctx[pb.ReviewDialogLevelRequest, pb.ReviewDialogLevelResponse],
    ) -> pb.ReviewDialogLevelResponse:
        raise NotImplementedError

    async def GenerateQualificationPrompt(
        self,
        request: pb.GenerateQualificationPromptRequest,
        context: Ctx[pb.GenerateQualificationPromptRequest, pb.GenerateQualificationPromptResponse],
    ) -> pb.GenerateQualificationPromptResponse:
        raise NotImplementedError
