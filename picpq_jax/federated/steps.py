"""Local training steps of one client: whole model, or split at the cut.

All functions are pure and act on one client's batch; the rounds in
:mod:`picpq_jax.federated.rounds` run them per client under ``shard_map`` and
``vmap``. A model part's trainable state is a :class:`PartState`; its ``masks`` and
``quant`` collections ride along as constant data (``consts``), never trained.

The optimizer ``tx`` is built with learning rate 1 (``sgd_nesterov(1.0, ...)``) and
each step scales its update by ``lr``, a traced scalar from the global schedule. For
SGD this equals ``sgd_nesterov(lr)`` bit for bit (the rate multiplies the final
update; a sign flip is exact), and the rate follows the global step even when a
client's optimizer state is reset every round.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from picpq_jax.federated.quantize import quantize_message
from picpq_jax.federated.split import SplitModel
from picpq_jax.train.steps import cross_entropy

Array = jax.Array
PyTree = Any
Metrics = dict[str, Array]


class PartState(flax.struct.PyTreeNode):
  """Trainable state of a model or of one side of the cut."""

  params: PyTree
  batch_stats: PyTree  # BN running statistics ({} when the part has no BN)
  opt_state: optax.OptState

  @classmethod
  def create(cls, variables: dict, tx: optax.GradientTransformation) -> PartState:
    """From a model's (or part's) variables and a fresh optimizer state."""
    return cls(params=variables["params"], batch_stats=variables.get("batch_stats", {}),
               opt_state=tx.init(variables["params"]))

  def variables(self, consts: dict) -> dict:
    """The Flax variables: these plus the constant ``masks`` and ``quant``."""
    return {"params": self.params, "batch_stats": self.batch_stats, **consts}


def constants(variables: dict) -> dict:
  """The untrained collections, ``{"masks", "quant"}``, of a variables dict."""
  return {k: variables.get(k, {}) for k in ("masks", "quant")}


def apply_update(tx: optax.GradientTransformation, part: PartState, grads: PyTree,
                 lr: Array) -> PartState:
  """One optimizer step with learning rate ``lr`` (float32 scalar, traced)."""
  updates, opt_state = tx.update(grads, part.opt_state, part.params)
  updates = jax.tree.map(lambda u: lr * u, updates)
  return part.replace(params=optax.apply_updates(part.params, updates), opt_state=opt_state)


def batch_metrics(loss: Array, logits: Array, labels: Array) -> Metrics:
  """Sums over a batch: ``{"loss_sum", "correct", "count"}`` float32 scalars."""
  n = jnp.asarray(labels.shape[0], jnp.float32)
  return {"loss_sum": loss * n,
          "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
          "count": n}


def _forward(module: nn.Module, params: PyTree, part: PartState, consts: dict,
             x: Array) -> tuple[Array, PyTree]:
  """Training-mode forward: ``(output, new batch_stats)``."""
  out, updates = module.apply({**part.variables(consts), "params": params}, x, train=True,
                              mutable=["batch_stats"])
  return out, updates.get("batch_stats", {})


def model_step(model: nn.Module, tx: optax.GradientTransformation, parts: dict[str, PartState],
               consts: dict, images: Array, labels: Array, lr: Array,
               bits: Array) -> tuple[dict[str, PartState], Metrics]:
  """One SGD step of the whole model (FedAvg client, centralized training).

  Args:
    model, tx: static.
    parts: ``{"model": PartState}``.
    consts: ``{"model": {"masks", "quant"}}``.
    images: float32 ``[B, H, W, C]``, augmented and normalized.
    labels: int32 ``[B]``.
    lr: float32 scalar.
    bits: unused (no cut).

  Returns:
    The new parts and the batch's metric sums.
  """
  del bits
  part = parts["model"]

  def loss_fn(params):
    logits, stats = _forward(model, params, part, consts["model"], images)
    return cross_entropy(logits, labels).mean(), (logits, stats)

  (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(part.params)
  part = apply_update(tx, part.replace(batch_stats=stats), grads, lr)
  return {"model": part}, batch_metrics(loss, logits, labels)


def smashed_keep(split: SplitModel, consts: dict) -> Array | None:
  """The mask of the smashed data's channel group (float32 ``[c]``): which channels are
  sent. Both parts hold every mask, so either part's ``consts`` serve. ``None`` when
  the smashed data is not a channel group (all of it is sent)."""
  return None if split.smashed_group is None else consts["masks"][split.smashed_group]


def client_forward(split: SplitModel, part: PartState, consts: dict,
                   images: Array) -> tuple[Array, Callable, PyTree]:
  """Client side to the cut: ``(smashed [B, h, w, c], vjp, new batch_stats)``.

  ``vjp(g)`` maps the smashed data's gradient ``g`` to ``(grads of part.params,)``.
  """
  return jax.vjp(lambda p: _forward(split.client, p, part, consts, images), part.params,
                 has_aux=True)


def server_step(split: SplitModel, tx: optax.GradientTransformation, part: PartState,
                consts: dict, smashed: Array, labels: Array, lr: Array,
                bits: Array) -> tuple[PartState, Array, Metrics]:
  """Server side from the cut: forward, backward, update.

  Args:
    smashed: float32 ``[B, h, w, c]`` as received (already quantized).
    labels: int32 ``[B]``.
    bits: int32 scalar, bits of the gradient sent back (``>= 32``: float32).

  Returns:
    ``(new server part, gradient of the smashed data as sent [B, h, w, c], metrics)``;
    the gradient of a pruned smashed channel is not sent (it is 0).
  """
  def loss_fn(params, h):
    logits, stats = _forward(split.server, params, part, consts, h)
    return cross_entropy(logits, labels).mean(), (logits, stats)

  (loss, (logits, stats)), (grads, g_smashed) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(part.params, smashed)
  part = apply_update(tx, part.replace(batch_stats=stats), grads, lr)
  return (part, quantize_message(g_smashed, bits, smashed_keep(split, consts)),
          batch_metrics(loss, logits, labels))


def client_update(tx: optax.GradientTransformation, part: PartState, vjp: Callable,
                  stats: PyTree, g_smashed: Array, lr: Array) -> PartState:
  """Client backward from the received gradient of its smashed data, then update."""
  (grads,) = vjp(g_smashed)
  return apply_update(tx, part.replace(batch_stats=stats), grads, lr)


def split_step(split: SplitModel, tx: optax.GradientTransformation,
               parts: dict[str, PartState], consts: dict, images: Array, labels: Array,
               lr: Array, bits: Array) -> tuple[dict[str, PartState], Metrics]:
  """One split-learning step of a client and its server copy (SplitFed-V1).

  Client forward to the cut, quantize the smashed data to ``bits`` (its kept channels),
  server forward, backward and update, quantize the smashed data's gradient, client
  backward and update. With ``bits >= 32`` the gradients equal those of the whole
  model.

  Args:
    parts: ``{"client": PartState, "server": PartState}``.
    consts: ``{"client": {...}, "server": {...}}`` masks and quant of each side.
    images: float32 ``[B, 32, 32, 3]``, augmented and normalized.
    labels: int32 ``[B]``.
    lr: float32 scalar.
    bits: int32 scalar.
  """
  client = parts["client"]
  smashed, vjp, stats = client_forward(split, client, consts["client"], images)
  server, g_smashed, metrics = server_step(
      split, tx, parts["server"], consts["server"],
      quantize_message(smashed, bits, smashed_keep(split, consts["client"])), labels, lr, bits)
  client = client_update(tx, client, vjp, stats, g_smashed, lr)
  return {"client": client, "server": server}, metrics
