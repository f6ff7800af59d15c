"""``train_and_evaluate``: the training run behind ``picpq train``.

Flat and readable top to bottom: check the workdir and the inputs, load and split the
data, build the model and optimizer, then hand the steps to the run engine
(:func:`picpq_jax.engine.run_task`: resume, progress, metrics, checkpoints,
interrupts), evaluating at each epoch's end. Every random draw derives from
``config.seed`` and the step number, so a resumed run reaches the same result as an
uninterrupted one.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from picpq_jax import data as pdata
from picpq_jax import engine
from picpq_jax import models
from picpq_jax.errors import UserError
from picpq_jax.train import optim
from picpq_jax.train.config import TrainConfig
from picpq_jax.train.steps import create_train_state, jit_eval_step, jit_train_step
from picpq_jax.utils import data_mesh, format_table, is_primary

LOG_EVERY = 10  # steps between train-metric records


def check_batch_size(batch_size: int, num_devices: int, num_processes: int) -> None:
  """UserError unless the global batch splits evenly over devices and hosts."""
  for n, what in ((num_devices, "devices"), (num_processes, "hosts")):
    if batch_size % n:
      raise UserError(
          f"--batch-size={batch_size} does not divide across {n} {what}: "
          f"use a multiple of {n}, e.g. {max(n, batch_size // n * n)}")


def load_data(config: TrainConfig, input_shape: tuple[int, ...]):
  """``(train, val)`` :class:`~picpq_jax.data.ImageDataset` s, checked against the model."""
  dataset = pdata.load_dataset(config.data, split="train", cache_dir=config.cache_dir,
                               image_size=config.image_size,
                               center_crop=pdata.EVAL_CENTER_CROP[config.augment])
  if tuple(dataset.images.shape[1:]) != tuple(input_shape):
    raise UserError(
        f"--data images are {tuple(dataset.images.shape[1:])} but --arch {config.arch} takes "
        f"{tuple(input_shape)}: choose a model for this image size or resize the data")
  train, val = pdata.train_val_split(dataset, config.val_size, config.seed)
  if len(train) < config.batch_size:
    raise UserError(
        f"--batch-size={config.batch_size} is larger than the {len(train)} training images: "
        f"use a smaller batch or a larger dataset")
  return train, val


def evaluate(eval_step: Callable, variables: dict, dataset, batch_size: int,
             to_global: Callable) -> dict[str, float]:
  """Mean loss and accuracy over every example of ``dataset`` exactly once."""
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  for batch in pdata.eval_batches(dataset, batch_size):
    out = eval_step(variables, *map(to_global, (batch["image"], batch["label"], batch["mask"])))
    for k, v in jax.device_get(out).items():
      totals[k] += float(v)
  count = max(totals["count"], 1.0)
  return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count}


@functools.lru_cache(maxsize=16)
def _cached_eval_step(model, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
  """One jitted eval step per (model, normalization), reused across calls."""
  return jit_eval_step(model, lambda x: pdata.normalize(x, jnp.asarray(mean), jnp.asarray(std)))


def evaluate_dataset(model, variables: dict, dataset, batch_size: int, mean, std,
                     ) -> dict[str, float]:
  """Mean loss and accuracy of ``model`` on every example of ``dataset`` (one device)."""
  step = _cached_eval_step(model, tuple(np.asarray(mean, np.float64).tolist()),
                           tuple(np.asarray(std, np.float64).tolist()))
  return evaluate(step, variables, dataset, batch_size, jnp.asarray)


def train_and_evaluate(config: TrainConfig, **kwargs) -> dict[str, Any]:
  """:func:`train`'s results (also written to ``workdir/results.json``)."""
  return train(config, **kwargs)[1]


def train(config: TrainConfig, *, stop_at_step: int | None = None,
          variables: dict | None = None, quantizer: models.Quantizer | None = None,
          print_fn: Callable[[str], None] = print) -> tuple[engine.Trained, dict[str, Any]]:
  """Trains ``config.arch`` on ``config.data``; checkpoints and metrics go to workdir.

  Args:
    config: the run's options.
    variables: start from these variables (e.g. a pruned model's, with its ``masks``
      and ``quant``) instead of a fresh initialization.
    quantizer: the layers' quantizer (default full precision).
    stop_at_step: stop (and checkpoint) after this step as if interrupted; for tests
      and for splitting a long run into sessions.
    print_fn: where the closing results table goes.

  Returns:
    ``(trained, results)``: the final variables with the run's metadata (what
    :func:`picpq_jax.engine.load_trained` reads back), and the results (also written
    to ``workdir/results.json``).
  """
  t_start = time.time()
  # --- Check everything cheap before touching the disk.
  spec = models.get_spec(config.arch)
  check_batch_size(config.batch_size, jax.device_count(), jax.process_count())
  workdir = engine.open_workdir(config)

  # --- Data.
  train_set, val = load_data(config, spec.input_shape)
  mean, std = pdata.channel_stats(train_set.images)
  steps_per_epoch = len(train_set) // config.batch_size
  total_steps = config.epochs * steps_per_epoch

  # --- Model, optimizer, state, placement.
  model = models.get_model(config.arch, num_classes=train_set.num_classes, dtype=config.dtype,
                           **({} if quantizer is None else {"quantizer": quantizer}))
  structure = models.model_structure(model, spec.input_shape)
  schedule = optim.make_schedule(
      config.schedule, config.lr, total_steps,
      warmup_steps=int(config.warmup_epochs * steps_per_epoch))
  tx = optim.sgd_nesterov(schedule, config.momentum, config.weight_decay)
  init_key, aug_key = jax.random.split(jax.random.key(config.seed))
  if variables is None:
    variables = models.init_variables(model, init_key, spec.input_shape)
  else:  # the steps donate their state: never consume the caller's arrays
    variables = jax.tree.map(jnp.copy, variables)
  mesh = data_mesh()
  state = jax.device_put(create_train_state(variables, tx), NamedSharding(mesh, P()))
  to_global = functools.partial(jax.make_array_from_process_local_data,
                                NamedSharding(mesh, P("data")))
  meta = {"config": config.to_dict(), "class_names": list(train_set.class_names),
          "normalization": {"mean": mean.tolist(), "std": std.tolist()},
          "num_train": len(train_set), "num_val": len(val), "steps_per_epoch": steps_per_epoch}
  if is_primary():
    workdir.write_config()

  # --- Steps.
  mean_j, std_j = jnp.asarray(mean), jnp.asarray(std)
  batched, device_augment = pdata.augmentation(config.augment, train_set)  # imagenet: host
  train_step = jit_train_step(
      model, tx, lambda key, x: pdata.normalize(device_augment(key, x), mean_j, std_j),
      conv_inputs=config.conv_inputs)
  eval_step = jit_eval_step(model, lambda x: pdata.normalize(x, mean_j, std_j))

  def step(state, batch, index):
    state, out = train_step(state, jax.random.fold_in(aug_key, index),
                            to_global(batch["image"]), to_global(batch["label"]))
    return state, {f"train_{k}": v for k, v in out.items()}

  def validate(state, done):
    if done % steps_per_epoch or not len(val):
      return {}
    found = evaluate(eval_step, state.variables, val, config.batch_size, to_global)
    return {"epoch": done // steps_per_epoch, **{f"val_{k}": v for k, v in found.items()}}

  task = engine.Task(
      init=lambda: state, template=state, total=total_steps,
      batches=lambda start: pdata.iterate_batches(batched, config.batch_size, config.seed,
                                                  start_step=start),
      step=step, evaluate=validate, log_every=LOG_EVERY,
      log_due=lambda done: done % steps_per_epoch == 0,
      annotate=lambda done: {"epoch": done / steps_per_epoch, "lr": float(schedule(done - 1))},
      checkpoint_every=config.checkpoint_every, keep=config.keep_checkpoints, meta=meta,
      label=f"train {config.arch}")
  outcome = engine.run_task(task, workdir.path, resume=workdir.resuming,
                            progress=config.progress, stop_at=stop_at_step)
  state = outcome.state
  val_metrics = {"loss": float("nan"), "accuracy": float("nan")}
  if outcome.evaluation:
    val_metrics = {k: outcome.evaluation[f"val_{k}"] for k in val_metrics}
  elif len(val):  # stopped between epochs, or resumed a finished run
    val_metrics = evaluate(eval_step, state.variables, val, config.batch_size, to_global)

  # --- Results.
  results = {
      "arch": config.arch, "data": config.data, "num_train": len(train_set),
      "num_val": len(val), "epochs": config.epochs, "steps": outcome.step,
      "total_steps": total_steps, "batch_size": config.batch_size,
      "params": models.param_count(state.params), "macs_per_example": structure.macs,
      "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"],
      "wall_time_s": time.time() - t_start,
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "checkpoint_dir": workdir.file("checkpoints"), "checkpoint_step": outcome.step,
      "finished": outcome.step >= total_steps,
  }
  if is_primary():
    workdir.write_json("results.json", results)
  print_fn(format_table(results.items()))
  trained = engine.Trained({k: getattr(state, k) for k in engine.artifacts.VARIABLES},
                           meta, outcome.step)
  return trained, results
