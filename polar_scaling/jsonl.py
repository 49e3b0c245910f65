"""Reading user-supplied JSONL files (prompts, preferences) with errors naming file:line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def iter_jsonl(path: str | Path, error: type[Exception] = ValueError,
               missing: type[Exception] = FileNotFoundError,
               what: str = "file") -> Iterator[tuple[str, object]]:
    """Yield ``("file:line", parsed object)`` for each non-blank line.

    A missing file raises ``missing``; a line that is not JSON raises ``error`` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise missing(f"{what} not found: {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not JSON ({e.msg})") from None
