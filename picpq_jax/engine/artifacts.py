"""Typed artifacts: the one public way to read what a run left in its workdir.

* :func:`load_trained` reads a ``picpq train`` run (or any run saved as a train
  state: compress's ``finetune/`` and ``qat/``): model variables, metadata, step.
* :func:`load_compressed` reads a ``picpq compress`` run: its plan (masks and
  bit-widths), its quantizer, the source it compressed and each stage's weights.

Every checkpoint is verified (:mod:`picpq_jax.engine.checkpoints`); a damaged newest
one gives way to the previous one.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import flax
import jax.numpy as jnp
import numpy as np

from picpq_jax import pretrained
from picpq_jax.engine.checkpoints import Checkpoints
from picpq_jax.errors import UserError
from picpq_jax.utils import read_json

VARIABLES = ("params", "batch_stats", "masks", "quant")
WEIGHT_STAGES = ("qat", "finetune")  # compress's trained stages, newest first


class Trained(NamedTuple):
  """A trained model as a run saved it."""

  variables: dict  # {"params", "batch_stats", "masks", "quant"}: nested dicts of arrays
  meta: dict  # "config" (the train config), "class_names", "normalization" {"mean", "std"}
  step: int  # the checkpoint's step


class Compressed(NamedTuple):
  """A ``picpq compress`` run: what it compressed, its plan and its trained stages."""

  workdir: str
  config: dict  # the compress config (config.json)
  source: Trained  # the `picpq train` checkpoint it compressed
  masks: dict  # {group: float32 [C]} 0/1
  quant: dict  # the model's ``quant`` collection: {layer...: {"w_bits", "a_bits"}} int32
  stages: dict  # {"finetune" | "qat": Trained} of the stages that have a checkpoint

  @property
  def quantizer(self) -> str:
    """The quantizer name of quantization-aware training (see ``compress.quantizers``)."""
    return self.config.get("quantizer", "dorefa")


def has_checkpoint(path: str) -> bool:
  """Whether the run in ``path`` has saved a checkpoint."""
  ckpt = os.path.join(path, "checkpoints")
  return os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))


def load_trained(path: str | os.PathLike, flag: str = "--from",
                 print_fn: Callable[[str], None] = print) -> Trained:
  """The newest intact checkpoint of a training run.

  Args:
    path: the run's workdir (holding ``checkpoints/``) or its checkpoints folder;
      ``"embedded"`` is the pretrained CIFAR-10 ResNet-20 that ships in the package.
    flag: the option that named ``path``, for error messages.
    print_fn: where a damaged checkpoint is named.
  """
  path = os.path.abspath(pretrained.resolve(os.fspath(path)))
  directory = os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    directory = path
  if not os.path.isdir(directory):
    raise UserError(f"{flag} {path} does not exist: pass the workdir of a `picpq train` run")
  checkpoints = Checkpoints(directory)
  try:
    found = checkpoints.restore_newest(None, print_fn, set_aside=False)  # not our run
  finally:
    checkpoints.close()
  if found is None:
    raise UserError(f"no checkpoint in {directory}: pass the workdir of a `picpq train` run "
                    f"that has saved one (it holds checkpoints/<step>/)")
  state, meta, step = found
  if not all(k in state for k in VARIABLES):
    raise UserError(f"{flag} {path} does not hold a model's variables: pass the workdir of "
                    f"a `picpq train` run")
  return Trained({k: state[k] for k in VARIABLES}, meta, step)


def load_plan(workdir: str) -> tuple[dict, dict]:
  """``(masks, quant)`` of a compress workdir's ``plan.npz`` as nested dicts."""
  path = os.path.join(workdir, "plan.npz")
  if not os.path.exists(path):
    raise UserError(f"{workdir} has no plan.npz: pass the workdir of a `picpq compress` run "
                    f"that has finished its plan stage")
  with np.load(path) as f:
    tree = flax.traverse_util.unflatten_dict({k: jnp.asarray(f[k]) for k in f.files}, sep="/")
  return dict(tree.get("masks", {})), dict(tree.get("quant", {}))


def load_compressed(workdir: str | os.PathLike, flag: str = "--client-from",
                    print_fn: Callable[[str], None] = print) -> Compressed:
  """A ``picpq compress`` run: config, source checkpoint, plan and trained stages."""
  workdir = os.path.abspath(workdir)
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise UserError(f"{flag} {workdir} is not a `picpq compress` workdir (no config.json): "
                    f"pass the --workdir of a compress run")
  config = read_json(config_path)
  masks, quant = load_plan(workdir)
  if "checkpoint" not in config:
    raise UserError(f"{flag} {workdir} is not a `picpq compress` workdir: pass the "
                    f"--workdir of a compress run")
  source = load_trained(config["checkpoint"], flag, print_fn)
  stages = {s: load_trained(os.path.join(workdir, s), flag, print_fn)
            for s in WEIGHT_STAGES if has_checkpoint(os.path.join(workdir, s))}
  return Compressed(workdir, config, source, masks, quant, stages)

