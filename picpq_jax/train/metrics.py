"""Metrics as JSON lines, and small helpers for files a person reads."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable


class JsonlWriter:
  """Appends one JSON object per line to ``path``, flushed after each write."""

  def __init__(self, path: str | os.PathLike, resume_from_step: int | None = None):
    """Opens ``path``; when resuming, drops records with ``step`` past the restored one."""
    self.path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    if resume_from_step is not None and os.path.exists(self.path):
      kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_from_step]
      write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    elif resume_from_step is None and os.path.exists(self.path):
      os.remove(self.path)
    self._file = open(self.path, "a", encoding="utf-8")

  def write(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """All records of a JSON-lines file."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def write_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename."""
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def format_table(rows: Iterable[tuple[str, Any]]) -> str:
  """A two-column plain-text table of ``(name, value)`` rows."""
  rows = [(str(k), _fmt(v)) for k, v in rows]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
  if isinstance(v, int):
    return f"{v:,}"
  return str(v)
