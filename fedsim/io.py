"""Run folders: atomic writes, so an interrupted run never leaves a corrupt file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedsim.registry import ConfigError


def check_out_dir(path: str | Path, what: str = "output folder") -> None:
    """Refuse (``ConfigError``) an output folder that cannot be one: ``path`` or the
    nearest existing folder above it is a file, or is not writable. Writes nothing."""
    path = Path(path)
    for p in (path, *path.parents):
        if not p.exists():
            continue
        if not p.is_dir():
            where = "" if p == path else f" (inside {p})"
            raise ConfigError(
                f"{what} {str(path)!r} cannot be created{where}: {str(p)!r} is a file; "
                "choose a folder path for --out"
            )
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{what} {str(path)!r}: {str(p)!r} is not writable; choose another --out"
            )
        return


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line and flush it to disk (a crash keeps every earlier line)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file, ignoring a torn last line."""
    records = []
    with open(path) as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records
