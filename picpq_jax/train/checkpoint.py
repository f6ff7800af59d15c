"""Orbax checkpoints of a :class:`~picpq_jax.train.steps.TrainState` plus JSON metadata.

Layout under ``directory``: one folder per saved step (``<step>/state`` holds the
state pytree in Orbax's standard format, ``<step>/meta`` a JSON object with the
run's configuration and data normalization). Orbax writes each step to a
temporary folder and renames it when complete, so an interrupted save never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """Saves every ``save_every`` steps (or when forced) and keeps the newest ``keep``."""

  def __init__(self, directory: str | os.PathLike, save_every: int = 1, keep: int = 2):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep, create=True,
        enable_async_checkpointing=False)
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or ``None``."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
    """Saves ``state`` and ``meta`` at ``step`` if due (or ``force``); True if saved."""
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores ``(state, meta)`` at ``step`` (default: newest) into ``template``'s
    structure, shapes, dtypes and shardings."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta)

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    """Only the JSON metadata of a checkpoint (cheap; no arrays are read)."""
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored.meta)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def load_variables(path: str | os.PathLike, step: int | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any], int]:
  """Model variables and metadata of a saved training run, without a template.

  Args:
    path: a run's workdir (holding ``checkpoints/``) or its checkpoints folder.
    step: which step (default: the newest).

  Returns:
    ``(variables, meta, step)``: ``{"params", "batch_stats", "masks", "quant"}`` as
    nested dicts of arrays, the JSON metadata, and the step restored.
  """
  from picpq_jax.errors import UserError  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(path)
  directory = os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    directory = path
  if not os.path.isdir(directory):
    raise UserError(f"--from {path} does not exist: pass the workdir of a `picpq train` run")
  checkpoints = Checkpoints(directory)
  step = checkpoints.latest_step() if step is None else step
  if step is None:
    raise UserError(f"no checkpoint in {directory}: pass the workdir of a finished "
                    f"`picpq train` run (it holds checkpoints/<step>/)")
  state = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))
  meta = checkpoints.restore_meta(step)
  variables = {k: state[k] for k in ("params", "batch_stats", "masks", "quant")}
  return variables, meta, step
