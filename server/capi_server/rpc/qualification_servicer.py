"""QualificationService: WhatsApp methods here, CRM methods in crm_methods.CrmMethods."""

from __future__ import annotations

import grpc

from capi.v1 import qualification_service_pb2 as pb
from capi.v1 import qualification_service_pb2_grpc as pb_grpc
from capi_server.rpc import mapping
from capi_server.rpc.crm_methods import CrmMethods
from capi_server.rpc.sender_servicer import dialog_ref, event_result
from capi_server.services.crm import CrmService
from capi_server.services.whatsapp import IncomingMessage, WhatsAppService

Ctx = grpc.aio.ServicerContext


class QualificationServicer(CrmMethods, pb_grpc.QualificationServiceServicer):
    def __init__(self, whatsapp: WhatsAppService, crm: CrmService) -> None:
        self._whatsapp = whatsapp
        self._crm = crm

    async def IngestMessage(
        self,
        request: pb.IngestMessageRequest,
        context: Ctx[pb.IngestMessageRequest, pb.IngestMessageResponse],
    ) -> pb.IngestMessageResponse:
        direction_id = mapping.optional_id(request.direction_id, "direction_id")
        instance = request.instance_name.strip() or None
        if request.raw_evolution_event:
            result = await self._whatsapp.ingest_raw(
                request.raw_evolution_event, direction_id, instance
            )
        else:
            result = await self._whatsapp.ingest(
                IncomingMessage(
                    direction_id=direction_id,
                    instance_name=instance,
                    contact_phone=request.contact_phone,
                    message_id=request.message_id,
                    from_me=request.from_me,
                    text=request.text,
                    sent_at=mapping.from_timestamp(request.sent_at, request.HasField("sent_at")),
                    ctwa_clid=request.ctwa_clid.strip() or None,
                )
            )
        return pb.IngestMessageResponse(
            dialog_id=str(result.dialog_id or ""),
            lead_id=str(result.lead_id or ""),
            stored=result.stored,
            skipped_reason=result.skipped_reason,
            has_ctwa_clid=result.has_ctwa_clid,
        )

    async def AnalyzeDialog(
        self,
        request: pb.AnalyzeDialogRequest,
        context: Ctx[pb.AnalyzeDialogRequest, pb.AnalyzeDialogResponse],
    ) -> pb.AnalyzeDialogResponse:
        ref = dialog_ref(request.dialog_id, request.instance_name, request.contact_phone)
        result = await self._whatsapp.analyze(ref, dry_run=request.dry_run, force=request.force)
        return pb.AnalyzeDialogResponse(
            dialog_id=str(result.dialog_id),
            levels=[
                pb.LevelDecision(
                    level=mapping.level_out(d.level),
                    reached=d.reached,
                    reason=d.reason,
                    evidence_message_ids=result.evidence.get(d.level, []),
                    held_for_review=d.level in result.held,
                )
                for d in result.levels
            ],
            events=[event_result(o) for o in result.events],
            llm_called=result.llm_called,
            llm_skipped_reason=result.llm_skipped_reason,
            model=result.model,
            confidence=result.confidence,
            skipped_reason=result.skipped_reason,
        )

    async def ReviewDialogLevel(
        self,
        request: pb.ReviewDialogLevelRequest,
        context: Ctx[pb.ReviewDialogLevelRequest, pb.ReviewDialogLevelResponse],
    ) -> pb.ReviewDialogLevelResponse:
        outcomes = await self._whatsapp.review(
            mapping.require_id(request.dialog_id, "dialog_id"),
            mapping.parse_level(request.level),
            request.approve,
        )
        return pb.ReviewDialogLevelResponse(events=[event_result(o) for o in outcomes])

    async def GenerateQualificationPrompt(
        self,
        request: pb.GenerateQualificationPromptRequest,
        context: Ctx[pb.GenerateQualificationPromptRequest, pb.GenerateQualificationPromptResponse],
    ) -> pb.GenerateQualificationPromptResponse:
        generated = await self._whatsapp.generate_prompt(
            mapping.require_id(request.direction_id, "direction_id"),
            request.business_description,
            request.language,
        )
        return pb.GenerateQualificationPromptResponse(prompt=generated.text, model=generated.model)
