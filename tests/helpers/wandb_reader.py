"""Read a W&B offline run file (``run-*.wandb``) back: a LevelDB-style log of protobuf ``Record``\\ s.

wandb ships the ``Record`` definitions (``wandb.proto.wandb_internal_pb2``) but no Python reader of the
file, so the tests carry this small one. Format: a 7-byte header (``:W&B``, magic ``0xBEE1``, version),
then 32 KiB blocks of chunks, each ``crc32 (4) | length (2) | type (1) | payload``, where a record is one
FULL chunk or FIRST, MIDDLE..., LAST chunks; a block tail shorter than a chunk header is zero padding.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    """Return every record of a ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    ident, magic, _ = FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file")
    records, parts, offset = [], [], FILE_HEADER.size
    while offset + CHUNK_HEADER.size <= len(data):
        room = BLOCK - offset % BLOCK
        if room < CHUNK_HEADER.size:
            offset += room
            continue
        _, length, kind = CHUNK_HEADER.unpack_from(data, offset)
        start = offset + CHUNK_HEADER.size
        if kind == 0 and length == 0:
            break
        parts.append(data[start:start + length])
        offset = start + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def wait_until_finished(path: str | Path, timeout: float = 60.0) -> None:
    """Wait until the run's ``exit`` record is in the file (the writer may still be flushing)."""
    deadline = time.monotonic() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in read_records(path)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no exit record after {timeout}s")
        time.sleep(0.2)


def history(path: str | Path) -> list[dict]:
    """Return the logged history rows, values decoded from JSON, keyed by the full metric name."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def summary(path: str | Path) -> dict:
    """Return the run summary as last updated."""
    values = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values
