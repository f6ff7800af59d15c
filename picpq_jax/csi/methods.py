"""Training a CSI autoencoder four ways on the same data, model and local steps.

A local step of every method is one jitted program over a ``(clients, stages)`` mesh
(``jax.shard_map``; the UEs sharded over ``clients``, several per device under
``vmap``), called once per step with the step index, learning rate and codeword
bits as traced data, so it compiles once for all rounds.

* ``centralized``: all CSI is uploaded once; the whole autoencoder trains on the
  union of the UEs' batches (``U * B`` samples per step).
* ``fedavg``: every UE trains its copy of the whole autoencoder for ``E`` steps
  from the global one (fresh Adam state each round), then the copies are averaged
  with the UEs' sample counts as weights (``psum`` over ``clients``).
* ``split``: each UE's encoder is its own; the BTS decoder is one shared model. Each
  step the UEs encode their batch (codewords optionally quantized to ``k`` bits,
  straight-through) and send the codewords and the CSI they encode (the training
  targets, as split learning sends labels; quantized to ``target_bits``); the BTS
  decodes every UE's codewords (one micro-batch per UE), takes the MSE, updates
  the decoder and sends each UE the gradient of its codewords; the UEs back-propagate
  it through their encoders. Encoders are never averaged unless ``encoder_sync``
  rounds say so (then FedAvg of the encoders at the end of every such round).
* ``pipeline``: ``split`` with the decoder run by the GPipe schedule of
  :mod:`picpq_jax.csi.pipeline` over the mesh's ``stages`` axis; its step equals
  ``split``'s to float tolerance.

Redundant BTS work (known, left as is): the split step all-gathers every UE's codewords
and each device of the ``clients`` axis decodes all of them, so with ``C`` clients
devices the BTS's computation is repeated ``C`` times (identical results; only wall time
and energy are wasted). A deployment would run the decoder once, on the BTS's own
devices (the ``stages`` axis); ``picpq csi`` keeps ``C`` small by creating one simulated
CPU device per stage. The bytes and the round-time model count the BTS once.

Loss: the MSE between reconstruction and input in [0, 1] (CsiNet's); optimizer Adam.
The split step's loss is the mean over UEs of each UE's batch MSE, batch norm at the
BTS per UE micro-batch; with one UE it is the centralized step exactly.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from picpq_jax.csi.config import METHODS, SPLIT_METHODS
from picpq_jax.csi.pipeline import STAGES, bts_loss_and_grads, mse
from picpq_jax.errors import UserError
from picpq_jax.federated.averaging import weighted_average
from picpq_jax.federated.distributed import AXIS
from picpq_jax.federated.quantize import quantize_message
from picpq_jax.federated.steps import PartState, apply_update

ADAM = optax.adam(1.0)  # the learning rate scales each update (see federated.steps)

Array = jax.Array


class CsiState(flax.struct.PyTreeNode):
  """A method's state between rounds (what a checkpoint holds).

  ``parts``: ``{"model"}`` (centralized, fedavg: the global autoencoder) or
  ``{"encoders", "decoder"}`` (split methods: encoders stacked ``[U, ...]``).
  """

  round: Array
  parts: dict[str, PartState]


def csi_mesh(num_ues: int, stages: int = 1, devices: int = 0) -> Mesh:
  """A ``(clients, stages)`` mesh: ``stages`` devices per BTS pipeline and the most
  ``clients`` devices (at most ``devices // stages`` when ``devices > 0``) that
  divide ``num_ues``."""
  available = devices or jax.device_count()
  if stages > available:
    raise UserError(f"--stages={stages} needs {stages} devices but {available} are "
                    f"available: use at most {available} stages (on CPU set XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={stages})")
  clients = next(c for c in range(available // stages, 0, -1) if num_ues % c == 0)
  grid = np.array(jax.devices()[:clients * stages]).reshape(clients, stages)
  return Mesh(grid, (AXIS, STAGES))


def method_mesh(method: str, num_ues: int, stages: int = 1) -> Mesh:
  """The mesh ``method`` trains on: ``stages`` devices on the ``stages`` axis for the
  pipeline, one stage otherwise; centralized on one device (its step is one model on
  every UE's batch, which more ``clients`` devices would only compute again)."""
  if method == "centralized":
    return csi_mesh(num_ues, 1, devices=1)
  return csi_mesh(num_ues, stages if method == "pipeline" else 1)


def init_state(method: str, variables: dict, tx: optax.GradientTransformation,
               num_ues: int) -> CsiState:
  """The initial state of ``method`` from the autoencoder's ``variables``; every UE's
  encoder starts from the same weights."""
  if method not in SPLIT_METHODS:
    parts = {"model": PartState.create(variables, tx)}
  else:
    enc = PartState.create(_sub(variables, "encoder"), tx)
    parts = {"encoders": jax.tree.map(lambda a: jnp.broadcast_to(a, (num_ues, *a.shape)), enc),
             "decoder": PartState.create(_sub(variables, "decoder"), tx)}
  # Copies: the round's step donates its input, and ``variables`` may start other runs.
  return CsiState(round=jnp.zeros((), jnp.int32), parts=jax.tree.map(jnp.copy, parts))


def _sub(variables: dict, name: str) -> dict:
  return {col: tree[name] for col, tree in variables.items() if name in tree}


def constants(variables: dict) -> dict:
  """The untrained collections of autoencoder ``variables``, split by side:
  ``{"model": {...}, "encoder": {...}, "decoder": {...}}`` (``quant``: bit-widths)."""
  consts = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
  return {"model": consts, "encoder": _sub(consts, "encoder"), "decoder": _sub(consts, "decoder")}


def _forward(module, part: PartState, params: Any, consts: dict, x: Array) -> tuple[Array, Any]:
  out, upd = module.apply({**consts, "params": params, "batch_stats": part.batch_stats}, x,
                          train=True, mutable=["batch_stats"])
  return out, upd.get("batch_stats", part.batch_stats)


def autoencoder_step(model, tx, part: PartState, consts: dict, x: Array,
                     lr: Array) -> tuple[PartState, Array]:
  """One Adam step of the whole autoencoder on ``x [B, 32, 32, 2]``: ``(part, loss)``."""
  def loss_fn(params):
    out, stats = _forward(model, part, params, consts, x)
    return mse(out, x), stats
  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(part.params)
  return apply_update(tx, part.replace(batch_stats=stats), grads, lr), loss


def split_step(model, tx, num_stages: int, parts: dict[str, PartState], consts: dict, x: Array,
               lr: Array, bits: Array, target_bits: Array) -> tuple[dict, Array]:
  """One step of the split method on this device's UEs (inside ``shard_map``).

  Args:
    parts: ``{"encoders": [u, ...] (this device's UEs), "decoder"}``.
    consts: :func:`constants` of the autoencoder.
    x: ``[u, B, 32, 32, 2]`` this device's UEs' batches.
    bits, target_bits: int32 scalars, bits of each codeword value and each target
      value on the uplink (``>= 32``: float32).

  Returns:
    ``(parts, loss)``; ``loss`` is the BTS's mean over all UEs.
  """
  enc_parts, dec = parts["encoders"], parts["decoder"]

  def encode(part, xu):
    cw, stats = _forward(model.encoder, part, part.params, consts["encoder"], xu)
    return quantize_message(cw, bits), stats
  codewords, enc_stats = jax.vmap(encode)(enc_parts, x)
  gather = lambda a: lax.all_gather(a, AXIS, tiled=True)
  targets = jax.vmap(lambda t: quantize_message(t, target_bits))(x)
  loss, g_dec, dec_stats, g_cw = bts_loss_and_grads(
      model.decoder, num_stages, dec.params, dec.batch_stats, consts["decoder"], gather(codewords),
      gather(targets))
  local = codewords.shape[0]
  g_cw = lax.dynamic_slice_in_dim(g_cw, lax.axis_index(AXIS) * local, local)

  def backward(part, xu, g, stats):
    _, vjp = jax.vjp(lambda p: _forward(model.encoder, part, p, consts["encoder"], xu)[0], part.params)
    return apply_update(tx, part.replace(batch_stats=stats), vjp(g)[0], lr)
  enc_parts = jax.vmap(backward)(enc_parts, x, g_cw, enc_stats)
  dec = apply_update(tx, dec.replace(batch_stats=dec_stats), g_dec, lr)
  return {"encoders": enc_parts, "decoder": dec}, loss


def step_program(method: str, model, tx: optax.GradientTransformation, mesh: Mesh) -> Callable:
  """``step(parts, consts, x, t, lr, bits, target_bits) -> (parts, loss)``: local step ``t`` of a
  round whose data ``x`` is ``[U, E, B, 32, 32, 2]`` sharded over ``clients``.

  Jitted once; ``t``, ``lr`` and the bits are traced. ``parts`` are donated.
  """
  ue = P(AXIS)
  num_stages = mesh.shape[STAGES]
  if method == "centralized":
    def body(parts, consts, x, t, lr, bits, target_bits):
      del bits, target_bits
      xt = lax.all_gather(x[:, t], AXIS, tiled=True)
      part, loss = autoencoder_step(model, tx, parts["model"], consts["model"], xt.reshape(-1, *xt.shape[2:]), lr)
      return {"model": part}, loss
    specs = {"model": P()}
  elif method == "fedavg":
    def body(parts, consts, x, t, lr, bits, target_bits):
      del bits, target_bits
      part, loss = jax.vmap(functools.partial(autoencoder_step, model, tx, consts=consts["model"], lr=lr))(
          parts["model"], x=x[:, t])
      return {"model": part}, lax.pmean(jnp.mean(loss), AXIS)
    specs = {"model": ue}
  elif method in SPLIT_METHODS:
    if method == "split" and num_stages != 1:
      raise ValueError("the split method runs on a mesh with one stage")
    body = lambda parts, consts, x, t, lr, bits, target_bits: split_step(
        model, tx, num_stages, parts, consts, x[:, t], lr, bits, target_bits)
    specs = {"encoders": ue, "decoder": P()}
  else:
    raise UserError(f"unknown CSI method {method!r}: choose from {', '.join(METHODS)}")
  program = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(specs, P(), ue, P(), P(), P(), P()),
                                  out_specs=(specs, P()), check_vma=False), donate_argnums=0)
  shardings = {k: NamedSharding(mesh, spec) for k, spec in specs.items()}

  def step(parts, *args):
    # The same shardings every call (a fresh or averaged state too): one compilation.
    return program({k: jax.device_put(v, shardings[k]) for k, v in parts.items()}, *args)
  return step


def _stack(part: PartState, num_ues: int, tx) -> PartState:
  """The global model copied to every UE, with a fresh optimizer state."""
  fresh = PartState(part.params, part.batch_stats, tx.init(part.params))
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_ues, *a.shape)), fresh)


def average_program(mesh: Mesh, tx: optax.GradientTransformation) -> Callable:
  """``average(stacked PartState [U], weights [U]) -> PartState``: the sample-weighted
  FedAvg of params and BN statistics (optimizer state restarted)."""
  def body(part, weight):
    params, stats = weighted_average((part.params, part.batch_stats), weight, AXIS)
    return PartState(params, stats, tx.init(params))
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=P(),
                               check_vma=False))


def round_program(method: str, model, tx: optax.GradientTransformation, mesh: Mesh,
                  encoder_sync: int = 0) -> Callable:
  """``round(state, consts, x, weights, lrs, bits, target_bits) -> (state, mean loss)``.

  ``x [U, E, B, 32, 32, 2]`` the round's batches, ``weights [U]`` the UEs' sample
  counts, ``lrs [E]``. FedAvg copies the global model to the UEs and averages at
  the end; the split methods average the encoders when ``encoder_sync > 0`` and the
  round's number is a multiple of it (0: never).
  """
  step = step_program(method, model, tx, mesh)
  average = average_program(mesh, tx)

  def run(state: CsiState, consts, x, weights, lrs, bits, target_bits):
    parts, losses = state.parts, []
    if method == "fedavg":
      parts = {"model": _stack(parts["model"], x.shape[0], tx)}
    for t in range(x.shape[1]):
      parts, loss = step(parts, consts, x, t, lrs[t], bits, target_bits)
      losses.append(loss)
    number = int(state.round) + 1
    if method == "fedavg":
      parts = {"model": average(parts["model"], weights)}
    elif method in SPLIT_METHODS and encoder_sync and number % encoder_sync == 0:
      parts = {**parts, "encoders": _stack(average(parts["encoders"], weights), x.shape[0], tx)}
    return CsiState(round=jnp.asarray(number, jnp.int32), parts=parts), jnp.mean(jnp.stack(losses))

  return run


def ue_variables(method: str, state: CsiState, num_ues: int) -> tuple[dict, dict]:
  """``(encoder variables stacked [U], decoder variables)`` of a state, without the
  constant collections (see :func:`reconstruct_program`)."""
  parts = state.parts
  if method in SPLIT_METHODS:
    enc, dec = parts["encoders"], parts["decoder"]
    return ({"params": enc.params, "batch_stats": enc.batch_stats},
            {"params": dec.params, "batch_stats": dec.batch_stats})
  m = parts["model"]
  enc = {"params": m.params["encoder"], "batch_stats": m.batch_stats["encoder"]}
  return (jax.tree.map(lambda a: jnp.broadcast_to(a, (num_ues, *a.shape)), enc),
          {"params": m.params["decoder"], "batch_stats": m.batch_stats["decoder"]})


def reconstruct_program(model) -> Callable:
  """``reconstruct(encoders [U], decoder, consts, x [U, N, 32, 32, 2]) -> x_hat`` in
  eval mode, each UE through its own encoder (``consts``: :func:`constants`)."""
  def one(enc, dec, consts, xu):
    cw = model.encoder.apply({**consts["encoder"], **enc}, xu, train=False)
    return model.decoder.apply({**consts["decoder"], **dec}, cw, train=False)
  program = jax.jit(jax.vmap(one, in_axes=(0, None, None, 0)))
  # On one device: vmap turns a conv with per-UE kernels into a grouped convolution,
  # and XLA's SPMD partitioner computes wrong values for a grouped 1x1 convolution
  # sharded over the groups (jax 0.10.2 and 0.12.1, CPU; reproducer:
  # experiments/csi/xla_grouped_conv.py). With the encoders sharded over 'clients', as
  # the round program leaves them, split CRNet CR 4 evaluated to +1.41 dB against
  # -2.83 dB for the same weights on one device.
  return lambda *args: program(*jax.device_get(args))
