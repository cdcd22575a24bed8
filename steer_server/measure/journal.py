"""An append-only JSONL file of finished work, so an interrupted evaluation resumes.

The first line is a header describing the run; a later start with the same path must
describe the same run (otherwise its records would be mixed with another's). Every other
line is one finished unit ``{"key": ..., ...}``, flushed as soon as it is done; a line cut
short by an interruption is dropped on reading and its unit is simply redone.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JournalMismatch(Exception):
    """The file at this path belongs to a different run."""


class Journal:
    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.records: dict[str, dict] = {}
        header_line = json.dumps({"header": header}, sort_keys=True)
        if path.exists() and path.stat().st_size:
            lines = path.read_text(encoding="utf-8").splitlines()
            if json.loads(lines[0]) != json.loads(header_line):
                raise JournalMismatch(f"{path} holds a different run (its first line describes it); "
                                      "give another output directory or delete the file to start over")
            for line in lines[1:]:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # the last line of an interrupted run
                self.records[record["key"]] = record
            self._file = path.open("a", encoding="utf-8")
            if not path.read_bytes().endswith(b"\n"):
                self._file.write("\n")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w", encoding="utf-8")
            self._file.write(header_line + "\n")
        self._file.flush()

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, key: str, record: dict[str, Any]) -> None:
        record = {"key": key, **record}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.records[key] = record

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
