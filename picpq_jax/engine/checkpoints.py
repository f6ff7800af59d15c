"""Orbax checkpoints that prove their contents: a digest per checkpoint, verified.

Layout under ``directory``: one folder per saved step; ``<step>/state`` holds the
state pytree in Orbax's standard format, ``<step>/meta`` a JSON object (the run's
configuration, what the loop needs to continue, and ``digest``: the SHA-256 of every
leaf's path, dtype, shape and bytes). Orbax writes each step to a temporary folder
and renames it when complete, so an interrupted save leaves no half checkpoint.

Restoring recomputes the digest and refuses a state that differs from what was
saved (a flipped bit, overwritten or truncated files) or that holds NaN/inf;
:meth:`Checkpoints.restore_newest` then names the damaged checkpoint in one line,
moves it to ``<directory>-damaged/`` and uses the previous one (two are kept).
"""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from picpq_jax.errors import UserError
from picpq_jax.utils import host_array, is_primary

KEEP = 2  # the newest and the one before it, in case the newest is damaged


class DamagedCheckpoint(Exception):
  """A checkpoint whose files cannot be read or whose contents fail verification."""


def _key_name(key: Any) -> str:
  for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def tree_digest(tree: Any) -> tuple[str, bool]:
  """``(sha256 hex, all finite)`` of a pytree.

  The digest covers every leaf's path (as names, so a state restored as plain dicts
  hashes like the dataclass it was saved from), dtype, shape and bytes, in path order;
  "finite" is whether every floating leaf is free of NaN and inf.
  """
  leaves = [("/".join(_key_name(k) for k in path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
  h, finite = hashlib.sha256(), True
  for name, leaf in sorted(leaves, key=lambda p: p[0]):
    a = np.ascontiguousarray(host_array(leaf))
    h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
    if np.issubdtype(a.dtype, np.inexact):
      finite = finite and bool(np.isfinite(a).all())
  return h.hexdigest(), finite


class Checkpoints:
  """Saves every ``save_every`` steps (or when forced) and keeps the newest ``keep``
  (at least :data:`KEEP`)."""

  def __init__(self, directory: str | os.PathLike, save_every: int = 1, keep: int = KEEP):
    self.directory = os.path.abspath(directory)
    self._options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=max(keep, KEEP), create=False,
        enable_async_checkpointing=False)
    self._manager = None

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:  # opened lazily: a fresh run's folder appears at its first save
      self._manager = ocp.CheckpointManager(self.directory, options=self._options,
                                            item_names=("state", "meta"))
    return self._manager

  def steps(self) -> list[int]:
    """Steps of the complete checkpoints, oldest first (none if the folder is absent)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or ``None``."""
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
    """Saves ``state`` and ``meta`` (plus the state's digest) at ``step`` if due (or
    ``force``); True if saved. A state holding NaN or inf is never saved (UserError)."""
    if step in self.steps() or not (force or self.manager.should_save(step)):
      return False
    digest, finite = tree_digest(state)
    if not finite:
      raise UserError(f"the state after step {step} holds NaN or inf (training diverged); "
                      f"not saved, the checkpoints in {self.directory} stand: lower the "
                      f"learning rate")
    os.makedirs(self.directory, exist_ok=True)
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave({**meta, "digest": digest})),
        force=True)

  def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """``(state, meta)`` at ``step`` (default: newest) in ``template``'s structure,
    shapes, dtypes and shardings (``None``: as saved, nested dicts of host arrays);
    :class:`DamagedCheckpoint` unless the contents are the ones saved and finite."""
    step = self.latest_step() if step is None else step
    abstract = None if template is None else jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                          template)
    hook = sys.unraisablehook  # a failed read leaves coroutines that print tracebacks
    sys.unraisablehook = lambda unraisable: None
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                        meta=ocp.args.JsonRestore()))
      state, meta = restored.state, dict(restored.meta)
    except Exception as e:  # orbax, tensorstore and json raise many kinds  # pylint: disable=broad-except
      raise DamagedCheckpoint(f"unreadable: {type(e).__name__}") from e
    finally:
      gc.collect()
      sys.unraisablehook = hook
    digest, finite = tree_digest(state)
    # a checkpoint saved before checkpoints carried digests (no "digest") is taken as read
    if "digest" in meta and meta["digest"] != digest:
      raise DamagedCheckpoint("its contents differ from what was saved (digest mismatch)")
    if not finite:
      raise DamagedCheckpoint("it holds NaN or inf")
    return state, meta

  def restore_newest(self, template: Any, print_fn: Callable[[str], None] = print,
                     set_aside: bool = True) -> tuple[Any, dict[str, Any], int] | None:
    """``(state, meta, step)`` of the newest intact checkpoint, or ``None`` if there is
    no checkpoint. A damaged one is named in one line and, with ``set_aside`` (a run
    resuming in its own workdir), moved aside; reading another run's checkpoints
    (``set_aside=False``) changes nothing on disk. If none is intact, a UserError says so."""
    damaged = False
    for step in reversed(self.steps()):
      try:
        state, meta = self.restore(template, step)
      except DamagedCheckpoint as e:
        damaged = True
        where = f"moved to {self._set_aside(step)}" if set_aside else "left as it is"
        print_fn(f"picpq: checkpoint {self.directory}/{step} is damaged ({e}); {where}; "
                 f"trying the one before it")
        continue
      return state, meta, step
    if damaged or os.path.isdir(self.directory + "-damaged"):
      raise UserError(f"no intact checkpoint is left in {self.directory} (damaged ones are "
                      f"named above or in {self.directory}-damaged): start again in another "
                      f"--workdir, or pass another run")
    return None

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    """Only the JSON metadata of a checkpoint (cheap; no arrays are read)."""
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored.meta)

  def _set_aside(self, step: int) -> str:
    target = os.path.join(self.directory + "-damaged", str(step))
    self.close()
    if is_primary():
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.rmtree(target, ignore_errors=True)
      os.replace(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"set aside {self.directory}/{step}")
    return target

  def close(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None
