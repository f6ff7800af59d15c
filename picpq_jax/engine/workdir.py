"""A run's folder: the guard, the resume check, atomic files and interrupts.

Every command opens its ``--workdir`` with :func:`open_workdir` before it does any
work. That refuses, in one line and before anything is written:

* a workdir that is a file, or that cannot be written;
* a workdir that already holds a run, unless ``--resume`` (``--resume`` on an empty
  one says that it starts fresh);
* ``--resume`` with a must-match option changed. Each config field declares whether
  it may change on resume (``option(..., may_change=True)``: where and how a run
  reports, or how long it runs); every other field must match ``config.json``.

While a workdir is open, SIGINT and SIGTERM (what a preempted VM or a scheduler
sends) only raise a flag; the loop (:mod:`picpq_jax.engine.loop`) checks it after
each step, saves the last finished state, prints one line and raises
:class:`Interrupted`. A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import stat
import sys
import threading
from typing import Any, Callable, Iterator

from picpq_jax.errors import UserError
from picpq_jax.utils import read_json, write_json

CONFIG = "config.json"


class Interrupted(Exception):
  """SIGINT or SIGTERM stopped the run after saving its last finished state."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum
    self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


# ----------------------------------------------------------------------------- signals

_pending: list[int] = []  # signals received while a workdir is open
_depth = [0]


def _on_signal(signum: int, frame: Any) -> None:
  del frame
  if _pending:  # the second signal: stop now, without saving
    raise KeyboardInterrupt
  _pending.append(signum)


@contextlib.contextmanager
def catching_signals() -> Iterator[None]:
  """Within the block, SIGINT and SIGTERM set a flag instead of stopping the process
  (nested blocks share it; only the main thread can install handlers)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  if _depth[0] == 0:
    _pending.clear()
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  _depth[0] += 1
  try:
    yield
  finally:
    _depth[0] -= 1
    if _depth[0] == 0:
      for s, handler in previous.items():
        signal.signal(s, handler)
      _pending.clear()


def interrupt_signal() -> int | None:
  """The signal number received since the workdir opened, or ``None``."""
  return _pending[0] if _pending else None


def stop_if_interrupted(what: str) -> None:
  """Raises :class:`Interrupted` (after printing ``what`` in one line) if a signal came."""
  signum = interrupt_signal()
  if signum is not None:
    message = f"picpq: {signal.Signals(signum).name}: {what}"
    print(message, file=sys.stderr, flush=True)
    raise Interrupted(signum, message)


# ----------------------------------------------------------------------------- checks

def check_writable(path: str, flag: str = "--workdir") -> None:
  """UserError unless ``path`` is (or can be created as) a writable folder."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag} {path} is a file, not a folder: pass a folder (new or a run's)")
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe) or "."
  if not os.path.isdir(probe):
    raise UserError(f"{flag} {path} cannot be created: {probe} is a file")
  mode = os.stat(probe).st_mode
  if not os.access(probe, os.W_OK | os.X_OK) or not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
    raise UserError(f"{flag} {path} is not writable ({probe} is read-only): make it "
                    f"writable or choose another {flag}")


def may_change_fields(config: Any) -> frozenset[str]:
  """Fields of a config dataclass declared ``option(..., may_change=True)``."""
  return frozenset(f.name for f in dataclasses.fields(config) if f.metadata.get("may_change"))


def _flag(config: Any, name: str) -> str:
  field = next(f for f in dataclasses.fields(config) if f.name == name)
  return (field.metadata.get("flags") or ("--" + name.replace("_", "-"),))[0]


def check_resume(saved: dict[str, Any], config: Any, where: str,
                 may_change: frozenset[str] | None = None) -> None:
  """UserError naming the first must-match field of ``config`` whose value differs
  from ``saved`` (a run's ``config.json``), both values and the fix."""
  may_change = may_change_fields(config) if may_change is None else may_change
  now = json.loads(json.dumps(dataclasses.asdict(config)))
  for name, value in now.items():
    if name in may_change or name not in saved or saved[name] == value:
      continue
    flag = _flag(config, name)
    raise UserError(f"cannot resume {where}: it was made with {flag}={saved[name]!r}, not "
                    f"{value!r}: pass {flag} {json.dumps(saved[name])} to continue it, or "
                    f"choose another --workdir")


# ----------------------------------------------------------------------------- the workdir

@dataclasses.dataclass
class Workdir:
  """An opened, checked workdir. ``resuming`` is whether it holds a run to continue."""

  path: str
  config: Any
  resuming: bool

  def file(self, *names: str) -> str:
    return os.path.join(self.path, *names)

  def write_config(self) -> None:
    """Creates the folder and writes ``config.json`` (after the inputs were checked)."""
    os.makedirs(self.path, exist_ok=True)
    write_json(self.file(CONFIG), dataclasses.asdict(self.config))

  def write_json(self, name: str, record: Any) -> None:
    write_json(self.file(name), record)


def holds_run(path: str) -> bool:
  """Whether ``path`` holds a run: its ``config.json`` or a checkpoint."""
  if os.path.exists(os.path.join(path, CONFIG)):
    return True
  ckpt = os.path.join(path, "checkpoints")
  return os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))


def open_workdir(config: Any, *, path: str | None = None,
                 may_change: frozenset[str] | None = None,
                 print_fn: Callable[[str], None] | None = None) -> Workdir:
  """Checks ``config.workdir`` (or ``path``) for a run with ``config`` and returns it.

  Writes nothing: the caller checks its inputs, then calls
  :meth:`Workdir.write_config`.

  Args:
    config: the command's frozen config (with ``workdir`` and ``resume`` fields).
    path: the folder, if not ``config.workdir``.
    may_change: fields that may differ on resume (default: the declared ones).
    print_fn: where "starts fresh" goes (default: stderr).
  """
  path = os.path.abspath(path or config.workdir)
  check_writable(path)
  existing = holds_run(path)
  if existing and not config.resume:
    raise UserError(f"{path} already holds a run: pass --resume to continue it, or choose "
                    f"another --workdir")
  if config.resume and not existing:
    (print_fn or (lambda s: print(s, file=sys.stderr)))(
        f"picpq: --resume: {path} holds no run yet; starting fresh")
  if existing and os.path.exists(os.path.join(path, CONFIG)):
    try:
      saved = read_json(os.path.join(path, CONFIG))
    except ValueError:
      raise UserError(f"{path}/{CONFIG} is damaged (not JSON): restore it or choose another "
                      f"--workdir") from None
    check_resume(saved, config, path, may_change)
  return Workdir(path, config, existing)
