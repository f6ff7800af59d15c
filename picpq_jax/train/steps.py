"""Train state and the jitted train and eval steps.

The state is one pytree: the model's four variable collections, the optimizer
state and the step counter. ``masks`` and ``quant`` ride along as data, so a step
compiled once serves any pruning mask and any bit-widths.

Performance switch ``conv_inputs`` of :func:`train_step` (same numerics, default
``"fused"``): XLA:CPU fuses the cheap elementwise ops that produce a conv's input
(BatchNorm, ReLU, mask, residual add) into every consumer instead of storing the
input once. In the backward pass the weight-gradient convolutions read the input
transposed, and XLA recomputes the input inside each transpose, for a ResNet the
whole residual stream of the stage back to its first block: in a ResNet-56 step
the transposes took 63% of the op time (``experiments/bench/RESULTS.md``).
``"materialized"`` computes each conv input (more than 3 channels) as a product
with an identity matrix, ``x @ I``: exact for finite values, and a dot is never
fused into its consumers, so the input is stored once and the transposes read it.
(``lax.optimization_barrier`` would be the natural tool, but XLA:CPU removes
barriers before fusion.)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from picpq_jax import compile_options
from picpq_jax.errors import UserError
from picpq_jax.models.layers import QConv
from picpq_jax.train.config import CONV_INPUTS

Array = jax.Array
PyTree = Any

_IDENTITY_BLOCK = 8  # channels per identity block of materialize (x @ I with I 8 x 8)


def materialize(x: Array) -> Array:
  """``x`` unchanged, computed as ``x @ I`` over blocks of the last axis (``[..., C]``,
  any float dtype; ``I`` is ``min(8, C)`` wide when that divides ``C``, else ``C``).

  Exact for finite values (``inf * 0`` makes NaN). XLA:CPU never fuses a dot into
  its consumers, so the result is stored once instead of being recomputed in each.
  """
  c = x.shape[-1]
  k = _IDENTITY_BLOCK if c % _IDENTITY_BLOCK == 0 else c
  y = jnp.dot(x.reshape(*x.shape[:-1], c // k, k), jnp.eye(k, dtype=x.dtype))
  return y.reshape(x.shape)


def _materialize_conv_inputs(next_fun, args, kwargs, context):
  """``nn.intercept_methods`` hook: a :class:`QConv` reads :func:`materialize` (input)."""
  if (context.method_name == "__call__" and isinstance(context.module, QConv) and args
      and args[0].shape[-1] > 3):
    args = (materialize(args[0]), *args[1:])
  return next_fun(*args, **kwargs)


def _conv_input_policy(conv_inputs: str):
  if conv_inputs not in CONV_INPUTS:
    raise UserError(f"unknown conv_inputs {conv_inputs!r}: choose one of {', '.join(CONV_INPUTS)}")
  if conv_inputs == "fused":
    return contextlib.nullcontext()
  return nn.intercept_methods(_materialize_conv_inputs)


class TrainState(flax.struct.PyTreeNode):
  """Everything a training run needs to resume, as a pytree."""

  step: Array  # int32 scalar: optimizer steps taken
  params: PyTree
  batch_stats: PyTree
  masks: PyTree  # {group: float32 [C]}
  quant: PyTree  # {layer path: {"w_bits": int32, "a_bits": int32}}
  opt_state: optax.OptState

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats,
            "masks": self.masks, "quant": self.quant}


def create_train_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
  """Wraps initial model variables and a fresh optimizer state."""
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables.get("batch_stats", {}), masks=variables.get("masks", {}),
      quant=variables.get("quant", {}), opt_state=tx.init(variables["params"]))


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Per-example softmax cross-entropy: logits ``[B, K]``, int labels ``[B]`` -> ``[B]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, images: Array, labels: Array, *, model: nn.Module,
               tx: optax.GradientTransformation, conv_inputs: str = "fused"
               ) -> tuple[TrainState, dict[str, Array]]:
  """One SGD step on a batch.

  Args:
    state: the current :class:`TrainState`.
    images: float32 ``[B, H, W, C]``, already augmented and normalized.
    labels: int32 ``[B]``.
    model, tx: static; bind them with ``functools.partial`` before ``jax.jit``.
    conv_inputs: ``"fused"`` (default) or ``"materialized"``, a performance switch
      with the same numerics (see the module docstring; faster on XLA:CPU).

  Returns:
    The new state and ``{"loss", "accuracy"}`` batch means (float32 scalars).
  """
  chex.assert_rank([images, labels], [4, 1])
  chex.assert_equal_shape_prefix([images, labels], 1)
  def loss_fn(params):
    with _conv_input_policy(conv_inputs):
      logits, updates = model.apply(
          {**state.variables, "params": params}, images, train=True, mutable=["batch_stats"])
    loss = cross_entropy(logits, labels).mean()
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return new_state, {"loss": loss, "accuracy": accuracy}


def eval_step(variables: dict, images: Array, labels: Array, weights: Array, *,
              model: nn.Module) -> dict[str, Array]:
  """Summed metrics of one evaluation batch (BN in inference mode).

  Args:
    variables: the model's variables.
    images: float32 ``[B, H, W, C]``, normalized.
    labels: int32 ``[B]``.
    weights: ``[B]``, 1 (True) for real examples and 0 (False) for padding.

  Returns:
    ``{"loss_sum", "correct", "count"}`` float32 scalars, so batches add up exactly.
  """
  chex.assert_rank([images, labels, weights], [4, 1, 1])
  chex.assert_equal_shape_prefix([images, labels, weights], 1)
  logits = model.apply(variables, images, train=False)
  weights = weights.astype(jnp.float32)
  return {
      "loss_sum": jnp.sum(cross_entropy(logits, labels) * weights),
      "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
      "count": jnp.sum(weights),
  }


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation,
                   preprocess: Callable[[Array, Array], Array],
                   conv_inputs: str = "fused") -> Callable:
  """``step(state, key, images_uint8, labels) -> (state, metrics)``, jitted.

  ``preprocess(key, images_uint8) -> float32 images`` (augmentation and
  normalization) is fused into the same program. The state buffers are donated.
  ``conv_inputs``: see :func:`train_step`.
  """
  def step(state, key, images, labels):
    return train_step(state, preprocess(key, images), labels, model=model, tx=tx,
                      conv_inputs=conv_inputs)
  return compile_options.jit(step, donate_argnums=0)


def jit_eval_step(model: nn.Module, preprocess: Callable[[Array], Array]) -> Callable:
  """``step(variables, images_uint8, labels, weights) -> summed metrics``, jitted."""
  def step(variables, images, labels, weights):
    return eval_step(variables, preprocess(images), labels, weights, model=model)
  return jax.jit(step)  # XLA's defaults: inference is faster with YNNPACK convs
