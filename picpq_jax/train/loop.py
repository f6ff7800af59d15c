"""``train_and_evaluate``: the training run behind ``picpq train``.

Flat and readable top to bottom: check the inputs, load and split the data, build
the model and optimizer, restore the newest checkpoint when resuming, then loop
over steps with a progress bar, evaluating at each epoch's end and saving
checkpoints on schedule. Every random draw derives from ``config.seed`` and the
step number, so a resumed run reaches the same result as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from picpq_jax import data as pdata
from picpq_jax import models
from picpq_jax.errors import UserError
from picpq_jax.train import optim
from picpq_jax.train.checkpoint import Checkpoints
from picpq_jax.train.config import TrainConfig
from picpq_jax.train.metrics import JsonlWriter, format_table, write_atomic
from picpq_jax.train.steps import create_train_state, jit_eval_step, jit_train_step

# Fields that must match between a checkpoint and a resumed run.
_RESUME_FIELDS = ("arch", "data", "image_size", "augment", "val_size", "epochs", "batch_size",
                  "lr", "schedule", "warmup_epochs", "momentum", "weight_decay", "seed")
LOG_EVERY = 10  # steps between train-metric records


def check_batch_size(batch_size: int, num_devices: int, num_processes: int) -> None:
  """UserError unless the global batch splits evenly over devices and hosts."""
  for n, what in ((num_devices, "devices"), (num_processes, "hosts")):
    if batch_size % n:
      raise UserError(
          f"--batch-size={batch_size} does not divide across {n} {what}: "
          f"use a multiple of {n}, e.g. {max(n, batch_size // n * n)}")


def check_workdir(config: TrainConfig, ckpt_dir: str) -> int | None:
  """The checkpoint step to resume from, or an error that protects finished work."""
  if not os.path.isdir(ckpt_dir):
    return None
  latest = Checkpoints(ckpt_dir).latest_step()
  if latest is None:
    return None
  if not config.resume:
    raise UserError(
        f"{config.workdir} already holds a checkpoint (step {latest}): pass --resume to "
        f"continue it, or choose another --workdir")
  return latest


def _check_resume_meta(meta: dict[str, Any], config: TrainConfig) -> None:
  saved = meta.get("config", {})
  for field in _RESUME_FIELDS:
    if field in saved and saved[field] != getattr(config, field):
      raise UserError(
          f"cannot resume: the checkpoint in {config.workdir} was made with "
          f"--{field.replace('_', '-')}={saved[field]!r}, not {getattr(config, field)!r}; "
          f"pass the same value or choose another --workdir")


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


def _save_on_interrupt(checkpoints: Checkpoints, step: int, state, meta: dict) -> None:
  """Saves the state reached, unless it is already saved or was consumed (donated)
  by the step that the interrupt cut short; the previous checkpoint stands then."""
  if checkpoints.latest_step() == step:
    return
  try:
    checkpoints.save(step, state, meta, force=True)
  except RuntimeError:  # "Array has been deleted": the interrupted step took the buffers
    pass


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


def train_and_evaluate(config: TrainConfig, *, stop_at_step: int | None = None,
                       variables: dict | None = None,
                       quantizer: models.Quantizer | None = None,
                       print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains ``config.arch`` on ``config.data``; writes checkpoints and metrics to workdir.

  Args:
    config: the run's options.
    variables: start from these variables (e.g. a pruned model's, with its ``masks``
      and ``quant``) instead of a fresh initialization.
    quantizer: the layers' quantizer (default full precision).
    stop_at_step: stop (and checkpoint) after this step as if interrupted; for tests
      and for splitting a long run into sessions.
    print_fn: where the closing results table goes.

  Returns:
    The results (also written to ``workdir/results.json``).
  """
  t_start = time.time()
  # --- Check everything cheap before touching the disk.
  spec = models.get_spec(config.arch)
  check_batch_size(config.batch_size, jax.device_count(), jax.process_count())
  ckpt_dir = os.path.join(os.path.abspath(config.workdir), "checkpoints")
  resume_step = check_workdir(config, ckpt_dir)

  # --- Data.
  train, val = load_data(config, spec.input_shape)
  mean, std = pdata.channel_stats(train.images)
  steps_per_epoch = len(train) // config.batch_size
  total_steps = config.epochs * steps_per_epoch

  # --- Model, optimizer, state, placement.
  model = models.get_model(config.arch, num_classes=train.num_classes, dtype=config.dtype,
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
  state = create_train_state(variables, tx)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  data_sharding = NamedSharding(mesh, P("data"))
  to_global = functools.partial(jax.make_array_from_process_local_data, data_sharding)

  meta = {"config": config.to_dict(), "class_names": list(train.class_names),
          "normalization": {"mean": mean.tolist(), "std": std.tolist()},
          "num_train": len(train), "num_val": len(val), "steps_per_epoch": steps_per_epoch}
  checkpoints = Checkpoints(ckpt_dir, config.checkpoint_every, config.keep_checkpoints)
  if resume_step is not None:
    _check_resume_meta(checkpoints.restore_meta(resume_step), config)
    state, _ = checkpoints.restore(state, resume_step)
  start_step = int(jax.device_get(state.step))
  os.makedirs(config.workdir, exist_ok=True)
  with open(os.path.join(config.workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f, indent=2)
  metrics = JsonlWriter(os.path.join(config.workdir, "metrics.jsonl"),
                        resume_from_step=start_step if resume_step is not None else None)

  # --- Steps.
  mean_j, std_j = jnp.asarray(mean), jnp.asarray(std)
  batched, device_augment = pdata.augmentation(config.augment, train)  # imagenet: on the host
  train_step = jit_train_step(
      model, tx, lambda key, x: pdata.normalize(device_augment(key, x), mean_j, std_j),
      conv_inputs=config.conv_inputs)
  eval_step = jit_eval_step(model, lambda x: pdata.normalize(x, mean_j, std_j))
  batches: Iterator[dict] = pdata.iterate_batches(batched, config.batch_size, config.seed,
                                                  start_step=start_step)
  val_metrics = {"loss": float("nan"), "accuracy": float("nan")}
  window: list[dict] = []
  bar = tqdm(total=total_steps, initial=start_step, disable=not config.progress,
             desc=f"train {config.arch}", unit="step", dynamic_ncols=True)
  step = start_step
  try:
    while step < total_steps and (stop_at_step is None or step < stop_at_step):
      batch = next(batches)
      state, out = train_step(state, jax.random.fold_in(aug_key, step),
                              to_global(batch["image"]), to_global(batch["label"]))
      step += 1
      window.append(out)
      bar.update(1)
      if step % LOG_EVERY == 0 or step % steps_per_epoch == 0:
        logged = {k: float(np.mean([jax.device_get(o[k]) for o in window])) for k in out}
        window = []
        metrics.write({"step": step, "epoch": step / steps_per_epoch,
                       "lr": float(schedule(step - 1)),
                       **{f"train_{k}": v for k, v in logged.items()}})
        bar.set_postfix(loss=f"{logged['loss']:.3f}", acc=f"{logged['accuracy']:.3f}")
      if step % steps_per_epoch == 0 and len(val):
        val_metrics = evaluate(eval_step, state.variables, val, config.batch_size, to_global)
        metrics.write({"step": step, "epoch": step // steps_per_epoch,
                       **{f"val_{k}": v for k, v in val_metrics.items()}})
        bar.write(f"epoch {step // steps_per_epoch}: val loss {val_metrics['loss']:.4f}, "
                  f"val accuracy {val_metrics['accuracy']:.4f}")
      checkpoints.save(step, state, meta)
  except KeyboardInterrupt:
    _save_on_interrupt(checkpoints, step, state, meta)
    print_fn(f"interrupted at step {step}; newest checkpoint: step "
             f"{checkpoints.latest_step()} in {ckpt_dir}: rerun with --resume to continue")
    checkpoints.close()
    raise
  finally:
    bar.close()
    metrics.close()
  if checkpoints.latest_step() != step:
    checkpoints.save(step, state, meta, force=True)
  checkpoints.close()
  if len(val) and not np.isfinite(val_metrics["loss"]):  # resumed a finished run
    val_metrics = evaluate(eval_step, state.variables, val, config.batch_size, to_global)

  # --- Results.
  results = {
      "arch": config.arch, "data": config.data, "num_train": len(train), "num_val": len(val),
      "epochs": config.epochs, "steps": step, "total_steps": total_steps,
      "batch_size": config.batch_size, "params": models.param_count(state.params),
      "macs_per_example": structure.macs, "val_loss": val_metrics["loss"],
      "val_accuracy": val_metrics["accuracy"], "wall_time_s": time.time() - t_start,
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "checkpoint_dir": ckpt_dir, "checkpoint_step": step, "finished": step >= total_steps,
  }
  write_atomic(os.path.join(config.workdir, "results.json"), json.dumps(results, indent=2))
  print_fn(format_table(results.items()))
  return results
