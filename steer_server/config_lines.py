"""The line format of the server's small configuration files (API keys, quotas): fields split
on whitespace, blank lines and lines starting with ``#`` skipped."""
from __future__ import annotations

from pathlib import Path


def config_lines(path: str | Path, what: str, error: type[ValueError]) -> list[tuple[str, list[str]]]:
    """``(where, fields)`` for each line that holds any, ``where`` naming the file and line for
    the caller's errors; ``error`` (naming ``what`` the file is) if the file cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read the {what} {path}: {exc}") from None
    return [(f"{path}, line {number}", line.split()) for number, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.strip().startswith("#")]
