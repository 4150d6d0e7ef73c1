"""Read an offline W&B run file back: its logged history, without a server (for checks and reports).

A `run-*.wandb` file is a 7-byte header (":W&B", magic 0xBEE1, version 0) followed by LevelDB-log
framed records (32 KiB blocks; each chunk: CRC32C, length, type) carrying `wandb.proto` Record messages.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

_HEADER = 7
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (missing :W&B header)")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:  # block trailer too small for a chunk header: zero padding
            pos += room
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if length == 0 and kind == 0:
            pos += room
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def wandb_file(run_dir: Path) -> Path:
    found = sorted(Path(run_dir).rglob("run-*.wandb"))
    if not found:
        raise FileNotFoundError(f"no offline W&B run file (run-*.wandb) under {run_dir}")
    return found[-1]


def read_history(path: Path) -> list[dict]:
    """Every `log` call of the run as a dict (keys as logged, plus `_step`), in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for payload in _payloads(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows
