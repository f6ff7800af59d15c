"""Federated fine-tuning over the ``clients`` mesh axis: FedIT and seed-only ZO.

Both rounds run the ``M`` participating clients sharded over the mesh axis
``clients`` of :func:`picpq_jax.federated.clients_mesh` with ``jax.shard_map``; a
device holding several clients runs them under ``vmap``, and each client's ``E``
local steps are a ``lax.scan`` (dense layers only: the convolution-in-scan slowdown
measured for :mod:`picpq_jax.federated.rounds` does not apply). The frozen base is
replicated and shared by a device's clients; only the trainable part is per client.

* :func:`fedit_round` - FedIT (Zhang et al. 2024): every client starts from the
  global trainable part (LoRA adapters, or any :class:`~picpq_jax.finetune.peft.
  Method`'s), runs ``E`` steps of a first-order optimizer whose state starts afresh
  each round, and the server averages the clients' trainable parts weighted by their
  sample counts (:func:`picpq_jax.federated.weighted_average`, a ``psum``). Traffic
  (:func:`fedit_traffic`): the trainable part down to and up from each client.
* :func:`zo_round` - zeroth-order with seed-only communication (FedKSeed, Qin et al.
  2024): all parties share a pool of ``K`` candidate seeds (``pool_key``; seed ``j``
  is the key ``fold_in(pool_key, j)``). At each local step a client draws a seed
  index ``j``, measures the SPSA projected gradient ``g`` along ``z(j)`` at its local
  parameters (:func:`picpq_jax.finetune.mezo.projected_gradient`) and steps
  ``theta -= lr g z(j)``. It uploads only its ``E`` pairs ``(j, g)``. The server sums
  the scalars per seed with the sample-count weights, ``G_j = sum_k w_k sum_{t: j_kt
  = j} g_kt``, and sends the ``K`` sums down; every client (and the server) then
  replays ``theta -= lr sum_j G_j z(j)`` from the round's start. Since each local
  update is linear in its ``z``, that is exactly the weighted average of the
  clients' local models (up to float rounding). Traffic (:func:`zo_traffic`): up
  ``E`` int32 indices and ``E`` float32 scalars per client, down ``K`` float32.

Keys: client ``c`` (global index ``0..M-1``) at local step ``t`` uses
``fold_in(fold_in(key, c), t)``: in FedIT as the train step's key, in the ZO round
split into ``(seed-draw key, loss key)``.

Round inputs: ``batch`` a pytree of ``[M, E, B, ...]`` leaves and ``weights`` float32
``[M]`` (sample counts; zero leaves a client out), both sharded over ``clients``;
``frozen`` and ``trainable`` replicated.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from picpq_jax.errors import UserError
from picpq_jax.federated.averaging import weighted_average
from picpq_jax.federated.comm import Traffic, message_bytes, tree_bytes
from picpq_jax.federated.distributed import AXIS
from picpq_jax.finetune import mezo
from picpq_jax.finetune.peft import Method, loss_of, make_train_step

Array = jax.Array


def _client_ids(count: int) -> Array:
  """Global indices ``[count]`` of this device's clients (inside ``shard_map``)."""
  return lax.axis_index(AXIS) * count + jnp.arange(count)


def _start(trainable: Any, count: int) -> Any:
  """The global trainable part copied for this device's ``count`` clients, ``[C, ...]``
  (typed as varying over ``clients``: local training makes it so)."""
  return jax.tree.map(lambda x: lax.pcast(jnp.broadcast_to(x, (count, *x.shape)), AXIS,
                                          to="varying"), trainable)


def _numbered(data: Any) -> tuple[Array, Any]:
  """``(t, data)`` for ``lax.scan`` over one client's ``[E, B, ...]`` batches."""
  return jnp.arange(jax.tree.leaves(data)[0].shape[0]), data


def fedit_round(loss_fn: Callable, optimizer: optax.GradientTransformation, method: Method,
                mesh: Mesh) -> Callable:
  """A FedIT round: local first-order training of the trainable part, then averaging.

  Args:
    loss_fn: ``loss_fn(params, batch, key, **extras) -> float32 scalar``.
    optimizer: the clients' optimizer (its state restarts every round, as in FedIT).
    method: the fine-tuning method (``lora.method(...)`` for FedIT proper).
    mesh: a mesh with a ``clients`` axis (``M`` a multiple of its size).

  Returns:
    ``round(frozen, trainable, batch, weights, key) -> (trainable, metrics)``: the
    new global trainable part (replicated) and ``{"loss": float32 [], the mean
    training loss over clients and steps}``. The input ``trainable`` is donated.
  """
  train = make_train_step(loss_fn, optimizer, method, jit=False)

  def device_round(frozen, trainable, batch, weights, key):
    count = weights.shape[0]

    def client(theta, data, cid):
      def one(carry, xs):
        theta, state = carry
        t, step_batch = xs
        theta, state, loss, _ = train.step(frozen, theta, state, step_batch,
                                           jax.random.fold_in(jax.random.fold_in(key, cid), t))
        return (theta, state), loss
      (theta, _), losses = lax.scan(one, (theta, train.init(theta)), _numbered(data))
      return theta, losses

    stacked, losses = jax.vmap(client)(_start(trainable, count), batch, _client_ids(count))
    total = lax.psum(jnp.sum(losses), AXIS)
    return weighted_average(stacked, weights, AXIS), {"loss": total / (lax.psum(count, AXIS)
                                                                        * losses.shape[1])}

  spec = P(AXIS)
  return jax.jit(jax.shard_map(device_round, mesh=mesh, in_specs=(P(), P(), spec, spec, P()),
                               out_specs=(P(), P())), donate_argnums=1)


def seed_key(pool_key: Array, index: Array) -> Array:
  """The key of candidate seed ``index`` of the pool: ``fold_in(pool_key, index)``."""
  return jax.random.fold_in(pool_key, index)


def replay(trainable: Any, aggregated: Array, pool_key: Array, lr: Array | float) -> Any:
  """``theta - lr sum_j G_j z(seed j)`` over the pool, skipping seeds with ``G_j = 0``.

  Args:
    trainable: the round's starting parameters.
    aggregated: float32 ``[K]`` per-seed weighted sums of projected gradients.
    pool_key: the pool's key.
    lr: learning rate (float scalar, may be traced).

  Returns:
    The updated pytree (same structure and dtypes).
  """
  def one(j, theta):
    g = aggregated[j]
    return lax.cond(g != 0, lambda t: mezo.perturb(t, seed_key(pool_key, j), -lr * g),
                    lambda t: t, theta)
  return lax.fori_loop(0, aggregated.shape[0], one, trainable)


def zo_round(loss_fn: Callable, method: Method, mesh: Mesh, *, pool_size: int = 4096,
             eps: float = 1e-3) -> Callable:
  """A zeroth-order round with seed-only communication (FedKSeed).

  Args:
    loss_fn: ``loss_fn(params, batch, key, **extras) -> float32 scalar``.
    method: which part the perturbations move (``full()``, ``lora.method(...)``...).
    mesh: a mesh with a ``clients`` axis.
    pool_size: ``K``, the candidate seeds shared by all parties.
    eps: SPSA perturbation scale.

  Returns:
    ``round(frozen, trainable, batch, weights, key, lr, pool_key) -> (trainable,
    info)``: the replayed global trainable part (replicated; every device computes it
    from the seeds itself) and ``info`` with ``"seeds"`` int32 ``[M, E]`` and
    ``"grads"`` float32 ``[M, E]`` (what the clients uploaded), ``"aggregated"``
    float32 ``[K]`` (what the server sent down) and ``"loss"`` float32 [] (mean of
    ``(L+ + L-)/2`` over clients and steps). ``trainable`` is donated.
  """
  if pool_size < 1:
    raise UserError(f"the seed pool needs at least one seed, got --pool-size={pool_size}")
  if not eps > 0:
    raise UserError(f"zeroth-order eps must be positive, got {eps}")
  loss = loss_of(loss_fn, method)

  def device_round(frozen, trainable, batch, weights, key, lr, pool_key):
    count = weights.shape[0]

    def client(theta, data, cid):
      def one(theta, xs):
        t, step_batch = xs
        draw, lkey = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, cid), t))
        j = jax.random.randint(draw, (), 0, pool_size)
        at = lambda th: loss(th, frozen, step_batch, lkey)  # noqa: E731
        g, theta, mean = mezo.projected_gradient(at, theta, seed_key(pool_key, j), eps)
        theta = mezo.perturb(theta, seed_key(pool_key, j), -lr * g)
        return theta, (j, g, mean)
      _, history = lax.scan(one, theta, _numbered(data))
      return history

    seeds, grads, means = jax.vmap(client)(_start(trainable, count), batch, _client_ids(count))
    w = weights.astype(jnp.float32)
    local = jnp.zeros((pool_size,), jnp.float32).at[seeds.reshape(-1)].add(
        (w[:, None] * grads).reshape(-1))
    aggregated = lax.psum(local, AXIS) / lax.psum(jnp.sum(w), AXIS)
    theta = replay(trainable, aggregated, pool_key, lr)
    loss_mean = lax.psum(jnp.sum(means), AXIS) / (lax.psum(count, AXIS) * means.shape[1])
    return theta, {"seeds": seeds, "grads": grads, "aggregated": aggregated, "loss": loss_mean}

  spec = P(AXIS)
  info = {"seeds": spec, "grads": spec, "aggregated": P(), "loss": P()}
  return jax.jit(jax.shard_map(device_round, mesh=mesh,
                               in_specs=(P(), P(), spec, spec, P(), P(), P()),
                               out_specs=(P(), info)), donate_argnums=1)


def fedit_traffic(trainable: Any, participants: int) -> Traffic:
  """One FedIT round: the trainable part (adapters) down to and up from each client,
  ``size * itemsize`` bytes per leaf."""
  size = tree_bytes(trainable)
  return Traffic(up={"adapters": participants * size}, down={"adapters": participants * size})


def zo_traffic(participants: int, local_steps: int, pool_size: int) -> Traffic:
  """One seed-only ZO round: up, per client and step, one int32 seed index and one
  float32 projected gradient; down, the ``K`` float32 per-seed sums to each client."""
  n = participants * local_steps
  return Traffic(
      up={"seeds": n * message_bytes((), jnp.int32), "grads": n * message_bytes((), jnp.float32)},
      down={"aggregated": participants * message_bytes((pool_size,), jnp.float32)})
