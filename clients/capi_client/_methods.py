"""The RPCs of capi.v1, read from the generated descriptors, and which of them are retried."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from capi.v1 import (
    capi_sender_service_pb2,
    qualification_service_pb2,
    settings_service_pb2,
)

SERVICES: tuple[ServiceDescriptor, ...] = (
    qualification_service_pb2.DESCRIPTOR.services_by_name["QualificationService"],
    capi_sender_service_pb2.DESCRIPTOR.services_by_name["CapiSenderService"],
    settings_service_pb2.DESCRIPTOR.services_by_name["SettingsService"],
)

# Safe to send again after a failure whose outcome is unknown: reads, plus the calls the
# server makes idempotent (exactly once per dialog and level, by message id, or setting
# the same values again). Create* would make a duplicate, and GenerateQualificationPrompt
# is an expensive LLM call, so those are never retried.
IDEMPOTENT_METHODS = frozenset(
    {
        # reads
        "GetDirection",
        "ListDirections",
        "ListPixelChoices",
        "ListCrmFields",
        "GetDialogStatus",
        "ListEvents",
        "Diagnose",
        "GetOptimizationAdvice",
        # idempotent by design on the server
        "SendConversion",
        "AnalyzeDialog",
        "IngestMessage",
        "CheckCrmFields",
        "HandleCrmWebhook",
        "RetryEvents",
        "ReviewDialogLevel",
        "ReconcileCrm",
        # masked updates set values: repeating one leaves the same state
        "UpdateUserAccount",
        "UpdateAdAccount",
        "UpdateCrmConnection",
        "UpdateDirection",
    }
)


@dataclass(frozen=True, slots=True)
class Rpc:
    """One RPC: its full path and message classes."""

    service: str
    name: str
    request_type: type[Message]
    response_type: type[Message]

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def idempotent(self) -> bool:
        return self.name in IDEMPOTENT_METHODS


def _message_class(module: Any, name: str) -> type[Message]:
    cls = getattr(module, name)
    assert isinstance(cls, type) and issubclass(cls, Message)
    return cls


def _load() -> dict[str, Rpc]:
    modules = (qualification_service_pb2, capi_sender_service_pb2, settings_service_pb2)
    rpcs: dict[str, Rpc] = {}
    for service, module in zip(SERVICES, modules, strict=True):
        for method in service.methods:
            rpcs[method.name] = Rpc(
                service=service.full_name,
                name=method.name,
                request_type=_message_class(module, method.input_type.name),
                response_type=_message_class(module, method.output_type.name),
            )
    return rpcs


RPCS: dict[str, Rpc] = _load()
