"""One federated round over a ``clients`` mesh axis, as a few programs compiled once.

A round takes the global state, runs ``E`` local steps on every participating client
and returns the new global state and the round's metric sums. The participants
(``M`` of them, a multiple of the mesh size) are sharded over the mesh axis
``clients`` with ``jax.shard_map``; a device holding several runs them under
``vmap``, or (``client_loop="unroll"``) one after another in the same program.

* :func:`parallel_round` - FedAvg (``{"model"}``) and SplitFed-V1
  (``{"client", "server"}``, one server copy per client): every client trains its
  own copy of every part, then all parts are averaged with the clients' sample
  counts as weights (``psum`` over ``clients``). The server copies' averaging
  happens inside the server, the client part's is the FedAvg exchange.
* :func:`sequential_round` - split learning with one server model (SplitFed-V2
  style): at each local step every client runs its forward pass in parallel, the
  server then takes the clients' smashed batches one after another in the round's
  client order (updating itself after each), and the clients run their backward
  passes in parallel. Client parts are averaged at the round's end.
* :func:`centralized_round` - ``E`` data-parallel steps of the whole model on
  global batches of ``M * B`` examples (the baseline: all data in one place).

The local steps are a host loop over one compiled step program, not a ``lax.scan``:
measured on XLA:CPU (jax 0.10.2, resnet8, batch 32), convolutions inside a scan ran
38 ms per example against 1.2 ms unrolled or as separate calls, and a step program
compiles once however large ``E`` is. Step index, learning rate, participants and
bits are traced data: later rounds never recompile.

Round inputs (``batch``): ``image`` uint8 ``[M, E, B, H, W, 3]``, ``label`` int32
``[M, E, B]``, ``client`` int32 ``[M]`` (ids, which seed each client's augmentation)
and ``weight`` float32 ``[M]`` (sample counts), all sharded over ``clients``;
``lrs`` float32 ``[E]`` the learning rate of each local step; ``key`` the round's
augmentation key; ``bits`` int32 scalar, bits of what crosses the cut (32: float32).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from picpq_jax import compile_options
from picpq_jax.federated.averaging import weighted_average
from picpq_jax.federated.distributed import AXIS
from picpq_jax.federated.quantize import quantize_message
from picpq_jax.federated.split import SplitModel
from picpq_jax.federated.steps import (PartState, client_forward, client_update, model_step,
                                       server_step, smashed_keep)

Array = jax.Array

# The programs of local steps differentiate each client's model inside shard_map. The
# library's straight-through quantizers (custom_vjp, e.g. DoReFa's clip to constant
# bounds) return a device-varying cotangent for a replicated constant, which shard_map's
# varying-axes check rejects (jax 0.10.2); no gradient there crosses a collective (the
# only collectives sum finished metrics), so the check is off for those programs.
LOCAL_CHECK_VMA = False
LocalStep = Callable[..., tuple[dict[str, PartState], dict[str, Array]]]
Preprocess = Callable[[Array, Array], Array]  # (key, uint8 images) -> float32 images


def _reset_optimizer(parts: dict[str, PartState], names: tuple[str, ...],
                     tx: optax.GradientTransformation) -> dict[str, PartState]:
  return {k: p.replace(opt_state=tx.init(p.params)) if k in names else p
          for k, p in parts.items()}


def _sum_metrics(metrics: dict[str, Array]) -> dict[str, Array]:
  """Per-device metric arrays of any shape -> totals over every device."""
  return {k: lax.psum(jnp.sum(v), AXIS) for k, v in metrics.items()}


def _map_clients(fn: Callable, client_loop: str, *xs: Any) -> Any:
  """``fn`` over the leading (this device's clients) axis of ``xs``; outputs stacked."""
  if client_loop == "vmap":
    return jax.vmap(fn)(*xs)
  count = jax.tree.leaves(xs)[0].shape[0]
  outs = [fn(*jax.tree.map(lambda a: a[i], xs)) for i in range(count)]
  return jax.tree.map(lambda *a: jnp.stack(a), *outs)


def _average_parts(parts: dict[str, PartState], weight: Array, reset: tuple[str, ...],
                   tx: optax.GradientTransformation) -> dict[str, PartState]:
  """Weighted average of stacked parts; optimizer states in ``reset`` restart instead."""
  out = {}
  for k, p in parts.items():
    if k in reset:
      params, stats = weighted_average((p.params, p.batch_stats), weight, AXIS)
      out[k] = PartState(params, stats, tx.init(params))
    else:
      out[k] = weighted_average(p, weight, AXIS)
  return out


def _stacker(mesh: Mesh, tx: optax.GradientTransformation, reset: tuple[str, ...]) -> Callable:
  """``start(parts, num) -> parts`` with leaves ``[num, ...]`` sharded over ``clients``:
  every client starts from the global state (optimizer states in ``reset`` restart)."""
  def start(parts, num):
    parts = _reset_optimizer(parts, reset, tx)
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (num, *a.shape)), parts)
  return jax.jit(start, static_argnums=1, out_shardings=NamedSharding(mesh, P(AXIS)))


def _settle(out: Any, mesh: Mesh) -> Any:
  """Waits for ``out`` on CPU meshes before the next program is dispatched.

  On XLA:CPU with simulated devices, several in-flight programs with collectives
  deadlocked under load (an all-gather rendezvous that 6 of 8 devices reached, then an
  abort; jax 0.10.2, 2 cores); finishing each step first avoids it, at no cost that
  matters on a CPU. Other backends keep asynchronous dispatch.
  """
  if mesh.devices.flat[0].platform == "cpu":
    jax.block_until_ready(out)
  return out


def _add(totals: dict[str, Array] | None, metrics: dict[str, Array]) -> dict[str, Array]:
  return metrics if totals is None else {k: totals[k] + metrics[k] for k in totals}


def parallel_round(local_step: LocalStep, tx: optax.GradientTransformation,
                   preprocess: Preprocess, mesh: Mesh, reset: tuple[str, ...] = (),
                   client_loop: str = "vmap") -> Callable:
  """FedAvg / SplitFed-V1 round: local training of every part per client, then averaging.

  Args:
    local_step: ``step(parts, consts, images, labels, lr, bits) -> (parts, metrics)``
      for one client (:func:`~picpq_jax.federated.steps.model_step` or
      :func:`~picpq_jax.federated.steps.split_step` with the model and ``tx`` bound).
    tx: the optimizer (learning rate 1).
    preprocess: augmentation and normalization of one client's uint8 batch.
    mesh: a mesh with a ``clients`` axis.
    reset: parts whose optimizer state restarts each round instead of being averaged
      (the clients' own state when it is not exchanged).
    client_loop: ``"vmap"`` or ``"unroll"`` over the clients of one device.

  Returns:
    ``round(parts, consts, batch, lrs, key, bits) -> (parts, metric sums)``; the input
    ``parts`` are consumed (their buffers donated).
  """
  spec = P(AXIS)

  def device_step(stacked, consts, image, label, client, t, lr, key, bits):
    def one(state, img, lab, cid):
      x = preprocess(jax.random.fold_in(jax.random.fold_in(key, cid), t), img[t])
      return local_step(state, consts, x, lab[t], lr, bits)
    stacked, metrics = _map_clients(one, client_loop, stacked, image, label, client)
    return stacked, _sum_metrics(metrics)

  start = _stacker(mesh, tx, reset)
  step = compile_options.jit(jax.shard_map(
      device_step, mesh=mesh, in_specs=(spec, P(), spec, spec, spec, P(), P(), P(), P()),
      out_specs=(spec, P()), check_vma=LOCAL_CHECK_VMA), donate_argnums=0)
  finish = jax.jit(jax.shard_map(
      functools.partial(_average_parts, reset=reset, tx=tx), mesh=mesh,
      in_specs=(spec, spec), out_specs=P()))

  def round_fn(parts, consts, batch, lrs, key, bits):
    image = batch["image"]
    stacked, totals = start(parts, image.shape[0]), None
    for t in range(image.shape[1]):
      stacked, metrics = step(stacked, consts, image, batch["label"], batch["client"], t,
                              lrs[t], key, bits)
      totals = _add(totals, _settle(metrics, mesh))
    return finish(stacked, batch["weight"]), totals

  return round_fn


def _server_programs(split: SplitModel, tx: optax.GradientTransformation, mesh: Mesh,
                     batch_size: int) -> tuple[Callable, Callable]:
  """``(to_server, visit)``: the one server model's programs for client batches of
  ``batch_size``.

  ``to_server(smashed, label, t)`` gathers the step's smashed batches ``[M, B, ...]``
  and labels ``[M, B]`` on every device, with zero gradients to fill. ``visit(server,
  grads, consts, smashed, labels, k, lr, bits)`` is the server's turn with client
  ``k``: when ``B`` divides over the devices each device computes its slice of the
  batch (the replicated server model's gradients are summed), so the server is not
  computed again on every device; the client's gradient goes to ``grads[k]``.
  """
  replicated = NamedSharding(mesh, P())
  split_batch = NamedSharding(mesh, P(AXIS) if batch_size % mesh.size == 0 else P())

  def visit(server, grads, consts, smashed, labels, k, lr, bits):
    h = lax.with_sharding_constraint(smashed[k], split_batch)
    server, g, metrics = server_step(split, tx, server, consts, h, labels[k], lr, bits)
    return server, grads.at[k].set(g), metrics

  to_server = jax.jit(lambda smashed, label, t: (smashed, label[:, t], jnp.zeros_like(smashed)),
                      out_shardings=(replicated, replicated, replicated))
  return to_server, compile_options.jit(visit, donate_argnums=(0, 1))


def sequential_round(split: SplitModel, tx: optax.GradientTransformation,
                     preprocess: Preprocess, mesh: Mesh, reset_client: bool = True,
                     client_loop: str = "vmap") -> Callable:
  """Split-learning round with one server model visited by the clients in turn.

  At each local step ``t``: (1) every client computes its smashed batch (shard_map
  over ``clients``); (2) the server runs ``server_step`` on each client's batch in
  the round's client order, updating the one server model after each client (each
  server step is data-parallel over the mesh: the batch is split over the devices,
  the replicated server model's gradients are summed); (3) every client recomputes
  its forward pass (rematerialization; the same key gives the same augmentation) and
  back-propagates the gradient it received (shard_map). The client parts are
  averaged with the sample counts at the end.

  Args:
    split: the cut model.
    tx, preprocess, mesh, client_loop: as in :func:`parallel_round`.
    reset_client: restart the clients' optimizer state each round instead of
      averaging it.

  Returns:
    ``round(parts, consts, batch, lrs, key, bits) -> (parts, metric sums)`` for
    ``parts = {"client", "server"}``; ``parts`` are consumed.
  """
  spec = P(AXIS)

  def device_forward(clients, consts, image, client, t, key, bits):
    def one(part, img, cid):
      x = preprocess(jax.random.fold_in(jax.random.fold_in(key, cid), t), img[t])
      smashed, _, _ = client_forward(split, part, consts, x)
      return quantize_message(smashed, bits, smashed_keep(split, consts))
    return _map_clients(one, client_loop, clients, image, client)

  def device_backward(clients, consts, image, client, t, key, g, lr):
    def one(part, img, cid, g_k):
      x = preprocess(jax.random.fold_in(jax.random.fold_in(key, cid), t), img[t])
      _, vjp, stats = client_forward(split, part, consts, x)
      return client_update(tx, part, vjp, stats, g_k, lr)
    return _map_clients(one, client_loop, clients, image, client, g)

  reset = ("client",) if reset_client else ()
  start = _stacker(mesh, tx, reset)
  server = functools.cache(functools.partial(_server_programs, split, tx, mesh))
  forward = compile_options.jit(jax.shard_map(
      device_forward, mesh=mesh, in_specs=(spec, P(), spec, spec, P(), P(), P()),
      out_specs=spec, check_vma=LOCAL_CHECK_VMA))
  backward = compile_options.jit(jax.shard_map(
      device_backward, mesh=mesh, in_specs=(spec, P(), spec, spec, P(), P(), spec, P()),
      out_specs=spec, check_vma=LOCAL_CHECK_VMA), donate_argnums=0)
  finish = jax.jit(jax.shard_map(
      functools.partial(_average_parts, reset=reset, tx=tx), mesh=mesh,
      in_specs=(spec, spec), out_specs=P()))

  def round_fn(parts, consts, batch, lrs, key, bits):
    image, label, client = batch["image"], batch["label"], batch["client"]
    clients, server_part, totals = start({"client": parts["client"]}, image.shape[0]), \
        parts["server"], None
    for t in range(image.shape[1]):
      smashed = forward(clients["client"], consts["client"], image, client, t, key, bits)
      to_server, server_visit = server(image.shape[2])
      smashed, labels, grads = _settle(to_server(smashed, label, t), mesh)
      for k in range(image.shape[0]):
        server_part, grads, metrics = server_visit(server_part, grads, consts["server"],
                                                   smashed, labels, k, lrs[t], bits)
        totals = _add(totals, _settle(metrics, mesh))
      clients = {"client": backward(clients["client"], consts["client"], image, client, t,
                                    key, grads, lrs[t])}
    return {"client": finish(clients, batch["weight"])["client"], "server": server_part}, totals

  return round_fn


def centralized_round(model, tx: optax.GradientTransformation, preprocess: Preprocess,
                      mesh: Mesh) -> Callable:
  """``E`` data-parallel steps of the whole model (the centralized baseline).

  ``batch["image"]`` is uint8 ``[E, G, H, W, 3]`` and ``batch["label"]`` int32
  ``[E, G]``, the global batch ``G`` sharded over ``clients``; BN statistics and
  gradients are those of the whole global batch (GSPMD inserts the reductions).

  Returns:
    ``round(parts, consts, batch, lrs, key, bits) -> (parts, metric sums)`` for
    ``parts = {"model"}``; ``parts`` are consumed.
  """
  data = NamedSharding(mesh, P(AXIS))

  def one_step(parts, consts, image, label, t, lr, key, bits):
    x = lax.with_sharding_constraint(preprocess(jax.random.fold_in(key, t), image[t]), data)
    return model_step(model, tx, parts, consts, x, label[t], lr, bits)

  step = compile_options.jit(one_step, donate_argnums=0)

  def round_fn(parts, consts, batch, lrs, key, bits):
    totals = None
    for t in range(batch["image"].shape[0]):
      parts, metrics = step(parts, consts, batch["image"], batch["label"], t, lrs[t], key, bits)
      totals = _add(totals, _settle(metrics, mesh))
    return parts, totals

  return round_fn
