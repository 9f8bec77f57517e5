"""Readable results: the contract's enums as Python enums, and File / Batch views over the generated
messages whose enum fields read as those enums and whose timestamps read as datetimes.

A view answers every other attribute from its message, compares equal to it, and hands it over
as `.message` for whoever wants the generated type itself (to serialise, copy, or pass to a stub).
"""

from __future__ import annotations

import datetime
import enum
from typing import Any

from google.protobuf import message as protobuf_message
from google.protobuf import timestamp_pb2

from batchgate.v1 import batch_pb2, file_pb2, usage_pb2

__all__ = ["BatchStatus", "FilePurpose", "CostStatus", "UsageGroupBy", "File", "Batch", "wrap", "to_datetime",
           "to_dict"]


class _ProtoEnum(enum.IntEnum):
    """An IntEnum over a proto enum: equal to the generated constants (`BatchStatus.COMPLETED ==
    batch_pb2.BATCH_STATUS_COMPLETED`), printed by its short lower-case name."""

    def __str__(self) -> str:
        return self.name.lower()

    def __format__(self, spec: str) -> str:
        # f"{status:<12}" is the name on every Python: 3.10's IntEnum formats the number
        return format(str(self), spec)

    @classmethod
    def parse(cls, text: str) -> "_ProtoEnum":
        """From a short name in any case ("completed"), the full proto name, or the number."""
        key = text.strip().upper()
        if key.isdigit():
            return cls(int(key))
        key = key.removeprefix(cls._proto_prefix)  # type: ignore[attr-defined]
        try:
            return cls[key]
        except KeyError:
            raise ValueError(f"{text!r} is not one of {', '.join(str(m) for m in cls)}") from None


def _from_proto(name: str, descriptor, prefix: str) -> Any:
    members = {v.name.removeprefix(prefix): v.number for v in descriptor.values}
    made = _ProtoEnum(name, members, module=__name__)
    made._proto_prefix = prefix
    return made


BatchStatus = _from_proto("BatchStatus", batch_pb2.BatchStatus.DESCRIPTOR, "BATCH_STATUS_")
FilePurpose = _from_proto("FilePurpose", file_pb2.FilePurpose.DESCRIPTOR, "FILE_PURPOSE_")
CostStatus = _from_proto("CostStatus", batch_pb2.CostStatus.DESCRIPTOR, "COST_STATUS_")
UsageGroupBy = _from_proto("UsageGroupBy", usage_pb2.UsageGroupBy.DESCRIPTOR, "USAGE_GROUP_BY_")

TERMINAL = frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})
TERMINAL_STATUSES = TERMINAL  # the name the client exported first


def to_datetime(ts: timestamp_pb2.Timestamp) -> datetime.datetime | None:
    """An aware UTC datetime; None for an unset timestamp (a state the batch has not reached)."""
    if not ts.seconds and not ts.nanos:
        return None
    return ts.ToDatetime(tzinfo=datetime.timezone.utc)


class _View:
    _enums: dict[str, Any] = {}
    __slots__ = ("message",)

    def __init__(self, message: protobuf_message.Message) -> None:
        object.__setattr__(self, "message", message)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.message, name)
        if name in self._enums:
            return _enum_or_number(self._enums[name], value)
        if isinstance(value, timestamp_pb2.Timestamp):
            return to_datetime(value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only; change .message instead")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _View):
            other = other.message
        return self.message == other

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.message.SerializeToString(deterministic=True)))

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *(f.name for f in self.message.DESCRIPTOR.fields)})

    def __reduce__(self):
        return (type(self), (self.message,))


class File(_View):
    """A file record. `purpose` is a FilePurpose, `created_at` / `expires_at` datetimes (None when unset)."""

    __slots__ = ()
    _enums = {"purpose": FilePurpose}

    def __repr__(self) -> str:
        m = self.message
        return (f"File(id={m.id!r}, filename={m.filename!r}, purpose={self.purpose}, bytes={m.bytes},"
                f" lines={m.line_count})")


class Batch(_View):
    """A batch state. `status` is a BatchStatus, the `*_at` fields datetimes (None until reached)."""

    __slots__ = ()
    _enums = {"status": BatchStatus}

    @property
    def done(self) -> bool:
        """The batch has ended (completed, failed, expired or cancelled)."""
        return self.status in TERMINAL

    def __repr__(self) -> str:
        m, c = self.message, self.message.request_counts
        return (f"Batch(id={m.id!r}, status={self.status}, model={m.model!r}, completed={c.completed},"
                f" failed={c.failed}, total={c.total})")


_VIEWS = {file_pb2.File: File, batch_pb2.Batch: Batch}


def wrap(message: Any) -> Any:
    """The view of a File or Batch message; any other value as it is."""
    view = _VIEWS.get(type(message))
    return view(message) if view is not None else message


_ENUMS_BY_NAME = {"batchgate.v1.BatchStatus": BatchStatus, "batchgate.v1.FilePurpose": FilePurpose,
                  "batchgate.v1.CostStatus": CostStatus, "batchgate.v1.UsageGroupBy": UsageGroupBy}


def to_dict(message: Any) -> dict[str, Any]:
    """A message (or view) as plain JSON values: every field present, enums by their short names
    ("completed"), timestamps as ISO 8601 strings (None when unset), 64-bit integers as numbers
    (protobuf's JSON mapping writes them as strings, which scripts must then convert)."""
    if isinstance(message, _View):
        message = message.message
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = dict(value)
        elif field.is_repeated:
            out[field.name] = [_plain(field, v) for v in value]
        elif field.has_presence and field.message_type is None and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _plain(field, value)
    return out


def _plain(field: Any, value: Any) -> Any:
    if isinstance(value, timestamp_pb2.Timestamp):
        when = to_datetime(value)
        return when.isoformat().replace("+00:00", "Z") if when else None
    if field.message_type is not None:
        return to_dict(value)
    if field.enum_type is not None:
        enum_cls = _ENUMS_BY_NAME.get(field.enum_type.full_name)
        return str(_enum_or_number(enum_cls, value)) if enum_cls is not None else value
    return value


def _enum_or_number(enum_cls: Any, value: int) -> Any:
    """The member, or the bare number of a value newer than this client (a server may add states)."""
    try:
        return enum_cls(value)
    except ValueError:
        return value
