"""A small reader of a W&B run's transaction log (``run-<id>.wandb``), for tests of offline runs.

Offline runs keep their history only in that file (no ``wandb-summary.json``, and ``wandb.Api``
needs a server). The format, stable so far but private to wandb (checked with wandb 0.31): a
7-byte header (``b":W&B"``, uint16 magic ``0xBEE1``, version byte 0), then 32 KiB blocks of
LevelDB-log records — a 7-byte header (crc32 uint32, length uint16, type uint8: 1 FULL, 2 FIRST,
3 MIDDLE, 4 LAST) and the payload — with zero padding at the end of a block. Each reassembled
payload is a ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

_BLOCK = 32 * 1024
_RECORD_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def payloads(path: str | Path) -> list[bytes]:
    """The raw payloads of every logical record in the file, in order."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError(f"{path} is not a W&B transaction log (bad header).")
    out: list[bytes] = []
    pending = b""
    offset = 7
    while offset + _RECORD_HEADER <= len(data):
        room = _BLOCK - offset % _BLOCK
        if room < _RECORD_HEADER:  # the block's tail is padding
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + _RECORD_HEADER])
        if kind == 0 and length == 0:  # zero padding up to the next block
            offset += room
            continue
        if offset + _RECORD_HEADER + length > len(data):  # a record still being written
            break
        body = data[offset + _RECORD_HEADER : offset + _RECORD_HEADER + length]
        offset += _RECORD_HEADER + length
        if kind == _FULL:
            out.append(body)
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            out.append(pending + body)
            pending = b""
        else:
            raise ValueError(f"Unknown record type {kind} at byte {offset} of {path}.")
    return out


def history(path: str | Path) -> list[dict[str, Any]]:
    """Every history row of the run as ``{key: value}`` (values decoded from their JSON)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for payload in payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def wait_until_closed(path: str | Path, timeout: float = 60.0) -> None:
    """Wait until wandb has written the run's exit record: ``wandb.finish()`` can return before
    the offline writer has flushed the file (seen on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while not records(path, "exit"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no exit record after {timeout} s: the run was not finished.")
        time.sleep(0.1)


def run_file(root: str | Path) -> Path:
    """The one ``run-*.wandb`` file under ``root`` (e.g. a WandbLogger's ``save_dir``)."""
    found = sorted(Path(root).glob("wandb/*run-*/run-*.wandb"))
    if len(found) != 1:
        raise FileNotFoundError(f"Expected one run-*.wandb under {root}/wandb, found {found}.")
    return found[0]


def records(path: str | Path, kind: str) -> list[Any]:
    """The payloads of every record of one kind (``"metric"``, ``"run"``, ``"summary"``, …)."""
    from wandb.proto import wandb_internal_pb2

    out = []
    for payload in payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == kind:
            out.append(getattr(record, kind))
    return out
