"""`capi`: the operator's command line (stdlib argparse over CapiClient).

Exit codes: 0 ok; 1 the server answered with an error; 2 usage error; 3 cannot connect;
4 not authenticated or not allowed. Expected failures print one line to stderr, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from capi.v1 import capi_sender_service_pb2 as sender_pb
from capi.v1 import resources_pb2 as res
from capi_client import _requests as rq
from capi_client._client import CapiClient
from capi_client._errors import CapiError

EXIT_OK = 0
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4

DEFAULT_TARGET = "127.0.0.1:50051"


class UsageError(Exception):
    """Bad command-line input found after argparse (exit 2)."""


# output helpers


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def print_json(data: object, out: TextIO) -> None:
    if isinstance(data, Message):
        out.write(json_format.MessageToJson(message=data, preserving_proto_field_name=True))
    else:
        out.write(json.dumps(data, indent=2, ensure_ascii=False))
    out.write("\n")


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces; no trailing spaces."""
    cells = [[str(h) for h in headers], *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    text = "-" if value is None or value == "" else str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def when(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def level_name(number: int) -> str:
    name = rq.short_name(res.Level.DESCRIPTOR, number)
    return f"{number} {name}" if name else ""


def enum_short(descriptor: Any, number: int) -> str:
    return rq.short_name(descriptor, number)


def flatten(message: Message, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted field path, display value) for every field of a message, in field order."""
    rows: list[tuple[str, str]] = []
    for field in message.DESCRIPTOR.fields:
        path = prefix + field.name
        value = getattr(message, field.name)
        if field.is_repeated:
            items = [to_dict(v) if isinstance(v, Message) else v for v in value]
            rows.append((path, json.dumps(items, ensure_ascii=False) if items else ""))
        elif isinstance(value, Timestamp):
            rows.append((path, when(value)))
        elif field.message_type is not None:
            rows += flatten(value, path + ".")
        elif field.enum_type is not None:
            rows.append((path, enum_short(field.enum_type, value)))
        elif isinstance(value, bool):
            rows.append((path, "true" if value else "false"))
        else:
            rows.append((path, str(value)))
    return rows


# direction set key=value


def _scalar(field: Any, raw: str) -> object:
    if field.enum_type is not None:
        return rq.enum_value(field.enum_type, raw)
    if field.type == FieldDescriptor.TYPE_BOOL:
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off", ""):
            return False
        raise ValueError(f"expected true or false, got {raw!r}")
    if field.cpp_type in (
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    ):
        return int(raw)
    if field.cpp_type in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return float(raw)
    return raw


def apply_assignment(direction: res.Direction, assignment: str) -> str:
    """Sets `path=value` on the direction; returns the path for the update mask.

    Scalars take plain text (enums by short name: capi.source=whatsapp); repeated and
    message fields take JSON (capi.interest_fields='[{"field_id": "1", "enum_id": "5"}]').
    """
    path, sep, raw = assignment.partition("=")
    path = path.strip()
    if not sep or not path:
        raise UsageError(f"expected key=value, got {assignment!r}")
    parent: Message = direction
    names = path.split(".")
    for name in names[:-1]:
        field = parent.DESCRIPTOR.fields_by_name.get(name)
        if field is None or field.message_type is None or field.is_repeated:
            raise UsageError(f"unknown field {path!r}")
        parent = getattr(parent, name)
    field = parent.DESCRIPTOR.fields_by_name.get(names[-1])
    if field is None:
        raise UsageError(f"unknown field {path!r}")
    try:
        if field.is_repeated or field.message_type is not None:
            json_format.ParseDict({field.name: json.loads(raw)}, parent)
        else:
            setattr(parent, field.name, _scalar(field, raw))
    except (ValueError, json_format.ParseError) as exc:
        raise UsageError(f"bad value for {path}: {exc}") from None
    return path


# commands


Handler = Callable[[CapiClient, argparse.Namespace, TextIO], None]


def cmd_health(client: CapiClient, args: argparse.Namespace, out: TextIO) -> None:
    status = client.health()
    if args.json:
        print_json({"status": status}, out)
    else:
        out.write(status + "\n")


def _print_direction(
    direction: res.Direction, warnings: Sequence[str], args: argparse.Namespace, out: TextIO
) -> None:
    if args.json:
        print_json(direction, out)
        return
    out.write(table(("FIELD", "VALUE"), flatten(direction)))
    for warning in warnings:
        out.write(f"warning: {warning}\n")


def cmd_direction_show(client: CapiClient, args: argparse.Namespace, out: TextIO) -> None:
    _print_direction(client.get_direction(args.id).direction, (), args, out)


def cmd_direction_list(client: CapiClient, args: argparse.Namespace, out: TextIO) -> None:
    directions = list(client.iter_directions(user_account_id=args.user_account))
    if args.json:
        print_json({"directions": [to_dict(d) for d in directions]}, out)
        return
    rows = [
        (
            d.id,
            d.name,
            d.user_account_id,
            d.instance_name,
            d.pixel_id,
            "on" if d.capi.enabled else "off",
            enum_short(res.CapiSource.DESCRIPTOR, d.capi.source),
        )
        for d in directions
    ]
    out.write(table(("ID", "NAME", "ACCOUNT", "INSTANCE", "PIXEL", "CAPI", "SOURCE"), rows))


def cmd_direction_set(client: CapiClient, args: argparse.Namespace, out: TextIO) -> None:
    direction = res.Direction(id=args.id)
    paths = [apply_assignment(direction, item) for item in args.assignments]
    response = client.update_direction(direction, paths)
    _print_direction(response.direction, response.warnings, args, out)


def cmd_status(client: CapiClient, args: argparse.Namespace, out: TextIO) -> None:
    response = client.get_dialog_status(instance_name=args.instance, contact_phone=args.phone)
    if args.json:
        print_json(response, out)
        return
    out.write(f"dialog {response.dialog_id}  direction {response.direction_id}  ")
    out.write(f"ctwa_clid {'yes' if response.has_ctwa_clid else 'no'}\n")
    rows = [
        (
            level_name(s.level),
            "yes" if s.sent else "no",
            when(s.sent_at),
            s.event_id,
            enum_short(res.EventStatus.DESCRIPTOR, s.status),
        )
        for s in response.levels
    ]
    out.write(table(("LEVEL", "SENT", "SENT_AT", "EVENT_ID", "STATUS"), rows))


def cmd_events(client: CapiClient, args: argparse.Namespace, out: TextIO) -> None:
    events: list[res.EventLogEntry] = []
    for event in client.iter_events(
        direction_id=args.direction,
        status=args.status,
        level=args.level,
        dialog_id=args.dialog,
        page_size=min(args.limit, 500),
    ):
        events.append(event)
        if len(events) >= args.limit:
            break
    if args.json:
        print_json({"events": [to_dict(e) for e in events]}, out)
        return
    rows = [
        (
            when(e.create_time),
            e.id,
            e.direction_id,
            e.dialog_id,
            level_name(e.level),
            e.event_name,
            enum_short(res.EventStatus.DESCRIPTOR, e.status),
            e.attempts,
            e.error_message,
        )
        for e in events
    ]
    headers = ("CREATED", "ID", "DIRECTION", "DIALOG", "LEVEL", "EVENT", "STATUS", "TRIES", "ERROR")
    out.write(table(headers, rows))


def cmd_retry(client: CapiClient, args: argparse.Namespace, out: TextIO) -> None:
    if not args.event_ids and not args.direction:
        raise UsageError("name event ids, or --direction ID [--status error]")
    response = client.retry_events(args.event_ids, direction_id=args.direction, status=args.status)
    if args.json:
        print_json(response, out)
    else:
        out.write(f"requeued {response.requeued}\n")


def cmd_diagnose(client: CapiClient, args: argparse.Namespace, out: TextIO) -> None:
    response = client.diagnose(args.direction)
    if args.json:
        print_json(response, out)
        return
    rows = [
        (f.check, enum_short(sender_pb.FindingStatus.DESCRIPTOR, f.status), f.detail, f.fix)
        for f in response.findings
    ]
    out.write(table(("CHECK", "STATUS", "DETAIL", "FIX"), rows))


def cmd_advice(client: CapiClient, args: argparse.Namespace, out: TextIO) -> None:
    response = client.get_optimization_advice(args.direction)
    if args.json:
        print_json(response, out)
        return
    out.write(
        f"optimise for: {level_name(response.recommended_level)} ({response.event_name})\n"
        f"why: {response.reason}\n"
    )
    rows = [
        (level_name(c.level), c.event_name, c.last_7_days, c.previous_7_days)
        for c in response.counts
    ]
    out.write(table(("LEVEL", "EVENT", "LAST_7_DAYS", "PREVIOUS_7_DAYS"), rows))


def _print_results(results: Sequence[res.EventResult], out: TextIO) -> None:
    rows = [
        (
            level_name(r.level),
            r.event_name,
            enum_short(res.SendOutcome.DESCRIPTOR, r.outcome),
            r.event_id,
            r.reason or r.hint,
        )
        for r in results
    ]
    out.write(table(("LEVEL", "EVENT", "OUTCOME", "EVENT_ID", "REASON"), rows))


def cmd_send(client: CapiClient, args: argparse.Namespace, out: TextIO) -> None:
    response = client.send_conversion(
        args.level,
        args.dialog,
        instance_name=args.instance,
        contact_phone=args.phone,
        direction_id=args.direction,
        test_event_code=args.test_event_code,
        value=args.value,
        currency=args.currency,
        dry_run=args.dry_run,
    )
    if args.json:
        print_json(response, out)
        return
    out.write(f"dialog {response.dialog_id}\n")
    _print_results(response.events, out)


def cmd_analyze(client: CapiClient, args: argparse.Namespace, out: TextIO) -> None:
    response = client.analyze_dialog(
        args.dialog,
        instance_name=args.instance,
        contact_phone=args.phone,
        dry_run=args.dry_run,
        force=args.force,
    )
    if args.json:
        print_json(response, out)
        return
    out.write(f"dialog {response.dialog_id}")
    if response.skipped_reason:
        out.write(f"  skipped: {response.skipped_reason}")
    out.write(
        f"  llm: {'called' if response.llm_called else response.llm_skipped_reason or 'no'}\n"
    )
    rows = [
        (
            level_name(d.level),
            "yes" if d.reached else "no",
            "yes" if d.held_for_review else "",
            d.reason,
        )
        for d in response.levels
    ]
    out.write(table(("LEVEL", "REACHED", "REVIEW", "REASON"), rows))
    if response.events:
        _print_results(response.events, out)


# argument parsing


def _level_arg(value: str) -> int:
    try:
        return rq.enum_value(res.Level.DESCRIPTOR, value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _status_arg(value: str) -> int:
    try:
        return rq.enum_value(res.EventStatus.DESCRIPTOR, value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capi", description="Operate the capi service.")
    parser.add_argument(
        "--target",
        default=os.environ.get("CAPI_TARGET") or DEFAULT_TARGET,
        help="host:port, http://host:port or https://host:port (env CAPI_TARGET)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("CAPI_TOKEN"), help="bearer token (env CAPI_TOKEN)"
    )
    parser.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    parser.add_argument("--ca-file", help="CA certificate (PEM) to verify the server with")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Handler, help_text: str, sub: Any = commands
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    command("health", cmd_health, "server health (grpc.health.v1)")

    direction = commands.add_parser("direction", help="show, list or change directions")
    direction_commands = direction.add_subparsers(
        dest="direction_command", required=True, metavar="ACTION"
    )
    p = command("show", cmd_direction_show, "show a direction", direction_commands)
    p.add_argument("id")
    p = command("list", cmd_direction_list, "list directions", direction_commands)
    p.add_argument("--user-account", metavar="ID")
    p = command(
        "set",
        cmd_direction_set,
        "change fields: pixel_id=123 capi.enabled=true capi.source=whatsapp name=...",
        direction_commands,
    )
    p.add_argument("id")
    p.add_argument("assignments", nargs="+", metavar="key=value")

    p = command("status", cmd_status, "which levels of a dialog were sent")
    p.add_argument("instance")
    p.add_argument("phone")

    p = command("events", cmd_events, "the event log, newest first")
    p.add_argument("--direction", metavar="ID")
    p.add_argument("--dialog", metavar="ID")
    p.add_argument("--status", type=_status_arg, help="pending, success, error or skipped")
    p.add_argument("--level", type=_level_arg, help="1-3 or interest/qualified/scheduled")
    p.add_argument("--limit", type=_positive, default=50)

    p = command("retry", cmd_retry, "re-queue failed events")
    p.add_argument("event_ids", nargs="*", metavar="EVENT_ID")
    p.add_argument("--direction", metavar="ID")
    p.add_argument("--status", type=_status_arg, help="status to re-queue (default error)")

    p = command("diagnose", cmd_diagnose, "run the troubleshooting checklist")
    p.add_argument("direction")
    p = command("advice", cmd_advice, "which event to optimise the ads for")
    p.add_argument("direction")

    p = command("send", cmd_send, "send a conversion level for a dialog")
    p.add_argument("--dialog", metavar="ID")
    p.add_argument("--instance")
    p.add_argument("--phone")
    p.add_argument("--direction", metavar="ID")
    p.add_argument(
        "--level", type=_level_arg, required=True, help="1-3 or interest/qualified/scheduled"
    )
    p.add_argument("--test-event-code")
    p.add_argument("--value", type=float)
    p.add_argument("--currency")
    p.add_argument("--dry-run", action="store_true")

    p = command("analyze", cmd_analyze, "judge a dialog and send the levels it reached")
    p.add_argument("dialog", nargs="?")
    p.add_argument("--instance")
    p.add_argument("--phone")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--force", action="store_true")
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on usage errors
    err = sys.stderr
    try:
        with CapiClient(
            args.target,
            token=args.token,
            tls=args.tls,
            ca_file=args.ca_file,
            timeout=args.timeout,
        ) as client:
            args.handler(client, args, sys.stdout)
    except UsageError as exc:
        err.write(f"capi: {exc}\n")
        return EXIT_USAGE
    except CapiError as exc:
        if exc.code == grpc.StatusCode.UNAVAILABLE:
            err.write(f"capi: cannot connect to {args.target}: {_one_line(exc.message)}\n")
            return EXIT_UNREACHABLE
        err.write(f"capi: error {_one_line(str(exc))}\n")
        if exc.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return EXIT_AUTH
        return EXIT_RPC_ERROR
    except (ValueError, OSError) as exc:
        # Bad target, unreadable CA file, a dialog named neither way...
        err.write(f"capi: {_one_line(str(exc))}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
