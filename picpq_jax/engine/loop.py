"""The one loop: every command's steps run here.

A command describes its work as a :class:`Task` (initial state, step, batches,
evaluation); :func:`run_task` restores the newest intact checkpoint, runs the
remaining steps with a progress bar, writes ``metrics.jsonl``, saves checkpoints on
schedule and at the end, and stops cleanly on SIGINT/SIGTERM. Training steps,
federated rounds, fine-tuning steps (or rounds) and search generations are all
steps of a task.

Metric records are deterministic: a record is the mean of the step metrics since the
previous record, and the steps not yet recorded travel in the checkpoint, so a
resumed run writes the same records as an uninterrupted one.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np
from tqdm import tqdm

from picpq_jax.engine.checkpoints import Checkpoints
from picpq_jax.engine.workdir import catching_signals, interrupt_signal, stop_if_interrupted
from picpq_jax.utils import JsonlWriter, is_primary, read_jsonl


def _no_evaluation(state: Any, done: int) -> dict[str, Any]:
  del state, done
  return {}


class Task(NamedTuple):
  """One run of steps.

  ``init() -> state`` builds the initial state of a fresh run (not called when a
  checkpoint is restored); ``template`` has the state's structure, shapes, dtypes and
  shardings (checkpoints restore into it). ``batches(start)`` yields step ``start``'s
  batch first. ``step(state, batch, index) -> (state, {name: scalar})`` runs step
  ``index`` (0-based). ``evaluate(state, done) -> {name: value}`` after ``done`` steps,
  ``{}`` when none is due. ``log_every``: a record (the mean of the step metrics) every
  N steps, and after each step that ``log_due(done)`` names; ``annotate(done)``
  adds fields to it (epoch, learning rate).
  """

  init: Callable[[], Any]
  template: Any
  total: int
  batches: Callable[[int], Iterator[Any]]
  step: Callable[[Any, Any, int], tuple[Any, dict[str, Any]]]
  evaluate: Callable[[Any, int], dict[str, Any]] = _no_evaluation
  log_every: int = 1
  log_due: Callable[[int], bool] = lambda done: False
  annotate: Callable[[int], dict[str, Any]] = lambda done: {}
  checkpoint_every: int = 1
  keep: int = 2  # checkpoints kept (at least 2)
  meta: dict = {}
  label: str = "run"
  unit: str = "step"


class Outcome(NamedTuple):
  """What :func:`run_task` returns."""

  state: Any  # the final (or stopped-at) state
  step: int  # steps done
  start: int  # the step this session started from (0, or the checkpoint's)
  records: list[dict]  # every metric record of the run, restored ones included
  evaluation: dict  # the last evaluation of this session ({} if none)


def _summarize(window: list[dict]) -> dict[str, Any]:
  """The mean of each numeric metric over ``window`` (float64); others: the last value."""
  if len(window) == 1:
    return dict(window[0])
  out = {}
  for k, v in window[-1].items():
    if isinstance(v, (list, dict, str, type(None))):
      out[k] = v
    else:
      out[k] = float(np.mean([float(w[k]) for w in window]))
  return out


def _host(metrics: dict) -> dict:
  return {k: (v if isinstance(v, (list, dict, str, type(None), int, float))
              else float(jax.device_get(v))) for k, v in metrics.items()}


def run_task(task: Task, directory: str, *, resume: bool = True, progress: bool = True,
             stop_at: int | None = None, print_fn: Callable[[str], None] = print) -> Outcome:
  """Runs ``task`` with checkpoints in ``directory/checkpoints`` and metrics in
  ``directory/metrics.jsonl``.

  Args:
    task: what to run.
    directory: the run's folder (checked by :func:`~picpq_jax.engine.open_workdir`).
    resume: continue from the newest intact checkpoint, if any.
    progress: show a progress bar.
    stop_at: stop (and checkpoint) after this many steps, as if interrupted.
    print_fn: where one-line notices (a damaged checkpoint) go.

  Returns:
    An :class:`Outcome`. Raises :class:`~picpq_jax.engine.Interrupted` after saving
    when SIGINT or SIGTERM arrived.
  """
  with catching_signals():
    return _run(task, directory, resume, progress, stop_at, print_fn)


def _run(task: Task, directory: str, resume: bool, progress: bool, stop_at: int | None,
         print_fn: Callable[[str], None]) -> Outcome:
  checkpoints = Checkpoints(os.path.join(directory, "checkpoints"), task.checkpoint_every,
                            task.keep)
  restored = checkpoints.restore_newest(task.template, print_fn) if resume else None
  if restored is None:
    state, start, window = task.init(), 0, []
  else:
    state, meta, start = restored
    window = list(meta.get("window", []))
  primary = is_primary()
  path = os.path.join(directory, "metrics.jsonl")
  records = ([r for r in read_jsonl(path) if r.get("step", 0) <= start]
             if restored is not None and os.path.exists(path) else [])
  metrics = JsonlWriter(path, resume_from_step=start if restored else None) if primary else None
  end = task.total if stop_at is None else min(task.total, stop_at)
  bar = tqdm(total=task.total, initial=start, disable=not (progress and primary),
             desc=task.label, unit=task.unit, dynamic_ncols=True)
  evaluation: dict = {}

  def write(record):
    records.append(record)
    if metrics:
      metrics.write(record)

  def save(done, force=False):
    checkpoints.save(done, state, {**task.meta, "step": done, "window": window}, force=force)

  done, batches = start, task.batches(start)
  try:
    while done < end:
      state, out = task.step(state, next(batches), done)
      done += 1
      window.append(_host(out))
      if done % task.log_every == 0 or task.log_due(done) or done == task.total:
        record = {"step": done, **task.annotate(done), **_summarize(window)}
        window = []
        write(record)
        bar.set_postfix({k: f"{v:.4g}" for k, v in list(record.items())[1:4]
                         if isinstance(v, float)})
      bar.update(1)
      found = task.evaluate(state, done)
      if found:
        evaluation = found
        write({"step": done, **found})
        bar.write(f"{task.unit} {done}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in found.items() if isinstance(v, float)))
      save(done, force=interrupt_signal() is not None)
      stop_if_interrupted(f"stopped after {task.unit} {done} of {task.total}; saved in "
                          f"{checkpoints.directory}: rerun with --resume to continue")
    if done > start or restored is None:
      save(done, force=True)
  finally:
    bar.close()
    if metrics:
      metrics.close()
    checkpoints.close()
  return Outcome(state, done, start, records, evaluation)
