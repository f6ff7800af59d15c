"""What the edge device runs and what it costs: starting weights, the PIC-PQ client.

``picpq federated --client-from <picpq compress workdir>`` splits the compressed model
instead of a fresh one: :func:`load_compressed` reads the run with
:func:`picpq_jax.engine.load_compressed` (its plan's masks and bit-widths, its
quantizer, each stage's weights) and starts from its newest trained weights (``qat/``,
else ``finetune/``, else the ``picpq train`` checkpoint it compressed, with the pruned
weights zeroed), as :func:`picpq_jax.compress.pipeline.quantized_start` starts
quantization-aware training. The
whole model is the compressed one (pruned, every layer at its planned bits); the cut
puts its front on the client, which therefore runs masked and fake-quantized, and its
back on the server (not an edge cost). ``--init-from`` starts from a plain ``picpq
train`` checkpoint instead (:func:`load_start`), e.g. the model that was compressed.

:func:`edge_cost` prices the client part with the cost model
(:mod:`picpq_jax.compress.cost_model`) against the same part unpruned at 32 bits, and
counts what crosses the network exactly: the smashed data carries only the kept
channels of its group, and the client model that is averaged each round only its kept
entries (:func:`picpq_jax.compress.compact` slices them out).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from picpq_jax import data as pdata
from picpq_jax import engine
from picpq_jax import models
from picpq_jax.compress import cost_model
from picpq_jax.compress.compact import compact, zero_pruned_weights
from picpq_jax.compress.pipeline import quantized_start
from picpq_jax.compress.quantizers import make_quantizer
from picpq_jax.errors import UserError
from picpq_jax.federated.split import SplitModel, split_model
from picpq_jax.models.quantizer import FullPrecision, Quantizer
from picpq_jax.models.structure import ModelStructure
from picpq_jax.utils import tree_bytes

WEIGHT_STAGES = engine.artifacts.WEIGHT_STAGES  # newest first
CLIENT_WEIGHTS = ("newest", *WEIGHT_STAGES, "checkpoint")


@dataclasses.dataclass(frozen=True)
class Start:
  """A run's starting point: whole-model variables and where they came from.

  Attributes:
    variables: ``{"params", "batch_stats", "masks", "quant"}`` of the whole model.
    quantizer: the static quantizer of every layer (``FullPrecision`` unless compressed).
    meta: the source's ``picpq train`` metadata (``config``, ``class_names``,
      ``normalization``), or ``None`` for a random initialization.
    info: JSON facts for the report (source paths, which weights, the quantizer).
  """

  variables: dict
  quantizer: Quantizer
  meta: dict | None
  info: dict


def _check_source(meta: dict, arch: str, num_classes: int, flag: str, path: str) -> None:
  source = meta["config"]["arch"]
  if source != arch:
    raise UserError(f"{flag} {path} holds a {source} model, not --arch {arch}: pass "
                    f"--arch {source}")
  if len(meta["class_names"]) != num_classes:
    raise UserError(f"{flag} {path} has {len(meta['class_names'])} classes but --data has "
                    f"{num_classes}: use the data it was trained on")


def load_compressed(workdir: str, arch: str, num_classes: int,
                    calibration: np.ndarray | None = None, weights: str = "newest") -> Start:
  """The PIC-PQ model of a ``picpq compress`` workdir as a starting point.

  Args:
    workdir: the compress run's workdir (``config.json``, ``plan.npz``, optionally
      ``finetune/`` and ``qat/``).
    arch: the architecture the run expects; must be the compressed one's.
    num_classes: classes of the run's data; must be the compressed model's.
    calibration: uint8 training images ``[N, H, W, C]`` that initialize LSQ steps when
      the weights predate quantization-aware training (unused otherwise).
    weights: which weights (:data:`CLIENT_WEIGHTS`): ``"newest"`` takes ``qat/``'s
      newest checkpoint, else ``finetune/``'s, else the compressed checkpoint's with
      its pruned weights zeroed; ``"qat"``, ``"finetune"`` or ``"checkpoint"`` pins
      one (a stage still training gives its newest checkpoint so far).

  Returns:
    A :class:`Start` whose masks and bit-widths are the plan's, whose weights are the
    chosen ones, and whose quantizer is the run's (``config.json``).
  """
  run = engine.load_compressed(workdir)
  meta = run.source.meta
  _check_source(meta, arch, num_classes, "--client-from", run.workdir)
  quantizer = make_quantizer(run.quantizer)
  model = models.get_model(arch, num_classes=num_classes, quantizer=quantizer)
  spec = models.get_spec(arch)
  structure = models.model_structure(model, spec.input_shape)
  if weights == "newest":
    stage = next((s for s in WEIGHT_STAGES if s in run.stages), None)
  elif weights in WEIGHT_STAGES:
    stage = weights
    if stage not in run.stages:
      raise UserError(f"--client-from {run.workdir} has no {stage}/ checkpoint yet: pass "
                      f"--client-weights with one of {', '.join(CLIENT_WEIGHTS)}")
  else:
    stage = None
  if stage is None:
    source = zero_pruned_weights({**run.source.variables, "masks": run.masks}, structure)
    weights = f"{run.config['checkpoint']} step {run.source.step}, pruned weights zeroed"
  else:
    source = run.stages[stage].variables
    weights = f"{stage}/ step {run.stages[stage].step}"
  fresh = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0),
                                                       spec.input_shape))
  _check_tree(source, fresh, "--client-from", run.workdir)
  norm = meta["normalization"]
  if calibration is not None:
    calibration = pdata.normalize(calibration, np.asarray(norm["mean"], np.float32),
                                  np.asarray(norm["std"], np.float32))
  variables = quantized_start(model, quantizer, source, run.masks, run.quant,
                              spec.input_shape, calibration)
  info = {"client_from": run.workdir, "weights": weights, "quantizer": run.quantizer,
          "kept_channels": {g: int(np.sum(np.asarray(m))) for g, m in run.masks.items()},
          "group_sizes": {g: int(np.size(m)) for g, m in run.masks.items()}}
  return Start(variables, quantizer, meta, info)


def _check_tree(variables: dict, expected: dict, flag: str, path: str) -> None:
  """UserError unless every array of ``variables`` has its shape in ``expected``."""
  have = traverse_util.flatten_dict({k: variables[k] for k in ("params", "batch_stats")})
  want = traverse_util.flatten_dict({k: expected[k] for k in ("params", "batch_stats")})
  if any(k not in want or np.shape(v) != tuple(want[k].shape) for k, v in have.items()):
    raise UserError(f"{flag} {path} holds variables of a different model than --arch builds "
                    f"(other widths or layers): pass a run of this architecture")


def load_start(path: str, arch: str, num_classes: int) -> Start:
  """Whole-model variables of a ``picpq train`` workdir (``--init-from``), as they were
  saved (masks and bit-widths included), with a full-precision model."""
  variables, meta, step = engine.load_trained(path, "--init-from")
  _check_source(meta, arch, num_classes, "--init-from", path)
  model = models.get_model(arch, num_classes=num_classes)
  spec = models.get_spec(arch)
  fresh = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0),
                                                       spec.input_shape))
  _check_tree(variables, fresh, "--init-from", path)
  return Start(variables, FullPrecision(), meta,
               {"init_from": os.path.abspath(path), "weights": f"step {step}"})


def _client_sent(split: SplitModel, variables: dict, structure: ModelStructure) -> dict:
  """Shapes of the client's ``params`` and ``batch_stats`` with only kept channels."""
  masks = variables["masks"]
  if all(bool(np.all(np.asarray(m) > 0)) for m in masks.values()):
    small_vars, small = variables, split
  else:
    small_model, small_vars = compact(split.full, variables, structure)
    small = split_model(small_model, split.cut, input_shape=structure.input_shape)
  client, _ = small.split(small_vars)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                      {"params": client["params"], "batch_stats": client["batch_stats"]})


def _cost_dict(cost: cost_model.Cost) -> dict[str, float]:
  return {"flops": float(cost.macs), "params": float(cost.params), "bops": float(cost.bops)}


def edge_cost(split: SplitModel, structure: ModelStructure, variables: dict) -> dict[str, Any]:
  """The client part's cost per example and what it sends, against it unpruned at 32 bits.

  Args:
    split: the cut model.
    structure: the whole model's :class:`~picpq_jax.models.ModelStructure`.
    variables: the whole model's variables (masks and ``quant`` are read).

  Returns:
    ``{"client": {flops, params, bops}, "client_full": {...}, "ratios": {...},
    "smashed_shape": [h, w, c], "smashed_channels_sent": kept c,
    "smashed_values": h*w*kept, "smashed_values_full": h*w*c, "client_sent":
    ShapeDtypeStruct tree of the client state exchanged (kept entries only),
    "client_model_bytes", "client_model_bytes_full"}``. FLOPs are MACs (the paper's
    count), BOPs ``MACs * w_bits * a_bits`` (see the cost model).
  """
  part = split.client_structure(structure)
  now = _cost_dict(cost_model.cost(part, variables["masks"], variables["quant"]))
  full = _cost_dict(cost_model.full_cost(part))
  x = jax.ShapeDtypeStruct((1, *structure.input_shape), jnp.float32)
  cv, _ = split.split(variables)
  shape = tuple(jax.eval_shape(split.client.apply, cv, x).shape[1:])
  kept = shape[-1]
  if split.smashed_group is not None:
    kept = int(np.sum(np.asarray(variables["masks"][split.smashed_group]) > 0))
  sent = _client_sent(split, variables, structure)
  full_sent = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                           {"params": cv["params"], "batch_stats": cv["batch_stats"]})
  pixels = int(np.prod(shape[:-1]))
  return {
      "client": now, "client_full": full,
      "ratios": {k: full[k] / now[k] if now[k] else None for k in now},
      "smashed_shape": list(shape), "smashed_channels_sent": kept,
      "smashed_values": pixels * kept, "smashed_values_full": pixels * shape[-1],
      "client_sent": sent, "client_model_bytes": tree_bytes(sent),
      "client_model_bytes_full": tree_bytes(full_sent),
  }
