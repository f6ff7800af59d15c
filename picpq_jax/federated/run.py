"""``run_federated``: the run behind ``picpq federated``.

Flat, top to bottom: load and split the data, partition it over the clients, build the
model (and its cut), then train each requested method for ``rounds`` rounds from the
same initial weights, evaluating, counting bytes and checkpointing after every round,
and finally write ``results.json``, ``report.md`` and ``plot.png``.

Every random draw derives from ``config.seed`` and the round number (partition,
participants, each client's batches, augmentation), so a resumed run repeats an
uninterrupted one. A method whose checkpoint already holds the last round is not
retrained; its metrics are read back.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import time
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from picpq_jax import data as pdata
from picpq_jax import engine
from picpq_jax import models
from picpq_jax.errors import UserError
from picpq_jax.federated import comm, edge as fedge, partition as fpart, report, rounds
from picpq_jax.federated.config import SPLIT_METHODS, FederatedConfig
from picpq_jax.federated.distributed import AXIS, clients_mesh
from picpq_jax.federated.split import SplitModel, split_model
from picpq_jax.federated.steps import PartState, constants, model_step, split_step
from picpq_jax.train import optim
from picpq_jax.train.loop import evaluate
from picpq_jax.train.steps import jit_eval_step
from picpq_jax.utils import is_primary, write_atomic, write_json


class FedState(flax.struct.PyTreeNode):
  """A method's global state between rounds (what a checkpoint holds)."""

  round: jax.Array  # int32 scalar: rounds finished
  parts: dict[str, PartState]  # {"model"} or {"client", "server"}


def _global_array(mesh: Mesh, spec: P, shape: tuple[int, ...],
                  fill: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
  """A sharded array whose shards ``fill(index)`` builds on the host that owns them."""
  return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), fill)


def _gather(source: np.ndarray, rows: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
  """``source[rows][index]``, reading only the examples that the shard ``index`` needs."""
  out = source[rows[index[:rows.ndim]]]
  return out[(slice(None),) * rows.ndim + tuple(index[rows.ndim:])]


def client_round_batch(mesh: Mesh, train: pdata.ImageDataset, parts: list[np.ndarray],
                       ids: np.ndarray, seed: int, round_index: int, local_steps: int,
                       batch_size: int) -> dict[str, jax.Array]:
  """The round's inputs for federated methods (see :mod:`picpq_jax.federated.rounds`).

  Returns ``image`` uint8 ``[M, E, B, H, W, 3]``, ``label`` int32 ``[M, E, B]``,
  ``client`` int32 ``[M]`` and ``weight`` float32 ``[M]`` (client sample counts), all
  sharded over ``clients``; each host reads only its own clients' images.
  """
  rows = np.stack([fpart.client_batch_indices(parts[k], seed, int(k), round_index,
                                              local_steps, batch_size) for k in ids])
  counts = np.asarray([len(parts[k]) for k in ids], np.float32)
  m, spec = len(ids), P(AXIS)
  return {
      "image": _global_array(mesh, spec, (*rows.shape, *train.image_shape),
                             lambda i: _gather(train.images, rows, i)),
      "label": _global_array(mesh, spec, rows.shape, lambda i: _gather(train.labels, rows, i)),
      "client": _global_array(mesh, spec, (m,), lambda i: ids.astype(np.int32)[i]),
      "weight": _global_array(mesh, spec, (m,), lambda i: counts[i]),
  }


def central_round_batch(mesh: Mesh, train: pdata.ImageDataset, seed: int, round_index: int,
                        local_steps: int, global_batch: int) -> dict[str, jax.Array]:
  """``E`` global batches of the union of the clients' data: ``[E, G, ...]``, G sharded.

  Global step ``s = round * E + t`` is batch ``s % S`` of epoch ``s // S`` of
  :func:`picpq_jax.data.batch_indices` (``S`` batches per epoch).
  """
  per_epoch = pdata.steps_per_epoch(len(train), global_batch)
  steps = round_index * local_steps + np.arange(local_steps)
  epochs = {e: pdata.batch_indices(len(train), global_batch, seed, int(e))
            for e in np.unique(steps // max(per_epoch, 1))}
  rows = np.stack([epochs[s // per_epoch][s % per_epoch] for s in steps])
  spec = P(None, AXIS)
  return {
      "image": _global_array(mesh, spec, (*rows.shape, *train.image_shape),
                             lambda i: _gather(train.images, rows, i)),
      "label": _global_array(mesh, spec, rows.shape, lambda i: _gather(train.labels, rows, i)),
  }


def load_client_data(config: FederatedConfig, input_shape: tuple[int, ...]):
  """``(train, val, parts)``: the data, checked against the model, and its partition."""
  dataset = pdata.load_dataset(config.data, split="train", cache_dir=config.cache_dir)
  if tuple(dataset.images.shape[1:]) != tuple(input_shape):
    raise UserError(f"--data images are {tuple(dataset.images.shape[1:])} but --arch "
                    f"{config.arch} takes {tuple(input_shape)}: choose a matching model or data")
  train, val = pdata.train_val_split(dataset, config.val_size, config.seed)
  if config.train_size:
    if config.train_size > len(train):
      raise UserError(f"--train-size={config.train_size} exceeds the {len(train)} training "
                      f"images: use at most {len(train)}, or 0 for all")
    keep = np.random.default_rng([config.seed, 3]).permutation(len(train))[:config.train_size]
    train = train.subset(np.sort(keep))
  parts = fpart.partition_labels(
      train.labels, config.clients, config.partition, config.seed, alpha=config.alpha,
      classes_per_client=config.classes_per_client,
      min_size=min(config.min_client_size, max(1, len(train) // config.clients)))
  return train, val, parts


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
  """What every method of a run shares: data, partition, mesh, model, optimizer, steps."""

  config: FederatedConfig
  train: pdata.ImageDataset
  val: pdata.ImageDataset
  parts: list[np.ndarray]  # each client's indices into train
  mesh: Mesh
  model: Any  # the whole model (unbound Flax module)
  split: SplitModel | None  # its cut, when a split method runs
  variables: dict  # initial variables, shared by every method
  edge: dict | None  # the client part's cost and what it sends (fedge.edge_cost)
  tx: Any  # optimizer with learning rate 1 (see picpq_jax.federated.steps)
  schedule: Callable  # global step -> learning rate
  preprocess: Callable  # (key, uint8 images) -> augmented, normalized float32
  eval_step: Callable  # jitted eval step of the whole model
  meta: dict  # JSON facts saved with every checkpoint


class Program(NamedTuple):
  """How one method trains: its initial state and the functions of its rounds."""

  state: FedState  # initial global state
  consts: dict  # masks and quant of each part
  round_fn: Callable  # (parts, consts, batch, lrs, key, bits) -> (parts, metric sums)
  eval_variables: Callable[[FedState], dict]  # the whole model's variables
  traffic: Callable[[int], comm.Traffic]  # bytes of round r (0-based)
  fp32_traffic: Callable[[int], comm.Traffic]  # the same without quantization


def _method_program(setup: Setup, method: str) -> Program:
  """The :class:`Program` of ``method``, all methods starting from ``setup.variables``."""
  c, tx = setup.config, setup.tx
  m = fpart.participants_per_round(c.clients, c.participation)
  if method in SPLIT_METHODS:
    cv, sv = setup.split.split(setup.variables)
    parts = {"client": PartState.create(cv, tx), "server": PartState.create(sv, tx)}
    consts = {"client": constants(cv), "server": constants(sv)}
    if method == "splitfed":
      fn = rounds.parallel_round(functools.partial(split_step, setup.split, tx), tx,
                                 setup.preprocess, setup.mesh,
                                 reset=() if c.sync_optimizer else ("client",),
                                 client_loop=c.client_loop)
    else:
      fn = rounds.sequential_round(setup.split, tx, setup.preprocess, setup.mesh,
                                   reset_client=not c.sync_optimizer, client_loop=c.client_loop)
    # Only the kept channels of the smashed data and kept entries of the client cross.
    smashed = jax.ShapeDtypeStruct((c.batch_size, *setup.edge["smashed_shape"][:-1],
                                    setup.edge["smashed_channels_sent"]), jnp.float32)
    labels = jax.ShapeDtypeStruct((c.batch_size,), jnp.int32)
    synced = _synced(setup.edge["client_sent"], tx, c.sync_optimizer)
    traffic = lambda r: comm.split_traffic(smashed, labels, synced, m, c.local_steps,
                                           c.smashed_bits)
    fp32 = lambda r: comm.split_traffic(smashed, labels, synced, m, c.local_steps)

    def eval_vars(state):
      return setup.split.merge(state.parts["client"].variables(consts["client"]),
                               state.parts["server"].variables(consts["server"]))
  else:
    parts = {"model": PartState.create(setup.variables, tx)}
    consts = {"model": constants(setup.variables)}
    if method == "fedavg":
      fn = rounds.parallel_round(functools.partial(model_step, setup.model, tx), tx,
                                 setup.preprocess, setup.mesh,
                                 reset=() if c.sync_optimizer else ("model",),
                                 client_loop=c.client_loop)
      synced = _synced(setup.variables, tx, c.sync_optimizer)
      traffic = lambda r: comm.fedavg_traffic(synced, m)
    else:
      fn = rounds.centralized_round(setup.model, tx, setup.preprocess, setup.mesh)
      images = jax.ShapeDtypeStruct(setup.train.images.shape, jnp.uint8)
      labels = jax.ShapeDtypeStruct(setup.train.labels.shape, jnp.int32)
      traffic = lambda r: comm.centralized_traffic(images, labels, first_round=r == 0)
    fp32 = traffic

    def eval_vars(state):
      return state.parts["model"].variables(consts["model"])
  state = FedState(round=jnp.zeros((), jnp.int32), parts=parts)
  return Program(state, consts, fn, eval_vars, traffic, fp32)


def _synced(variables: dict, tx: Any, with_optimizer: bool) -> dict:
  """What a client exchanges each round: params and BN statistics (and momentum), as
  shapes, given (the shapes of) the ``params`` and ``batch_stats`` it holds."""
  out = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  if with_optimizer:
    out["opt_state"] = jax.eval_shape(tx.init, out["params"])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), out)


def _run_round(setup: Setup, method: str, program: Program, state: FedState,
               r: int) -> tuple[FedState, dict[str, Any]]:
  """Round ``r`` (0-based) of ``method``: data, local training, averaging, evaluation."""
  c = setup.config
  t0 = time.time()
  m = fpart.participants_per_round(c.clients, c.participation)
  ids = fpart.sample_participants(c.clients, c.participation, c.seed, r)
  if method == "centralized":
    batch = central_round_batch(setup.mesh, setup.train, c.seed, r, c.local_steps,
                                m * c.batch_size)
  else:
    batch = client_round_batch(setup.mesh, setup.train, setup.parts, ids, c.seed, r,
                               c.local_steps, c.batch_size)
  lrs = optim.step_rates(setup.schedule, r * c.local_steps, c.local_steps)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(c.seed), 1), r)
  parts, out = program.round_fn(state.parts, program.consts, batch, lrs, key,
                                jnp.asarray(c.smashed_bits, jnp.int32))
  state = FedState(round=jnp.asarray(r + 1, jnp.int32), parts=parts)
  out = {k: float(v) for k, v in jax.device_get(out).items()}
  record = {"round": r + 1, "lr": float(lrs[-1]),
            "train_loss": out["loss_sum"] / out["count"],
            "train_accuracy": out["correct"] / out["count"],
            "participants": [int(i) for i in ids],
            **_traffic_record(program.traffic(r), program.fp32_traffic(r))}
  if len(setup.val) and ((r + 1) % c.eval_every == 0 or r + 1 == c.rounds):
    to_global = functools.partial(jax.make_array_from_process_local_data,
                                  NamedSharding(setup.mesh, P(AXIS)))
    eval_batch = -(-256 // setup.mesh.size) * setup.mesh.size
    val = evaluate(setup.eval_step, program.eval_variables(state), setup.val, eval_batch,
                   to_global)
    record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
  record["round_time_s"] = time.time() - t0
  return state, record


def train_method(setup: Setup, method: str, stop_after_round: int | None = None,
                 resume: bool = False) -> dict[str, Any]:
  """Trains one method for ``config.rounds`` rounds (resuming its checkpoint); returns
  its summary (see :func:`picpq_jax.federated.report.summarize`)."""
  c = setup.config
  name = c.run_name(method)
  directory = os.path.join(os.path.abspath(c.workdir), name)
  program = _method_program(setup, method)
  replicated = NamedSharding(setup.mesh, P())
  program = program._replace(state=jax.device_put(program.state, replicated),
                             consts=jax.device_put(program.consts, replicated))

  def step(state, r, index):
    del index  # = r
    return _run_round(setup, method, program, state, r)

  task = engine.Task(
      init=lambda: program.state, template=program.state, total=c.rounds,
      batches=itertools.count, step=step, keep=c.keep_checkpoints,
      meta={**setup.meta, "method": method}, label=name, unit="round")
  outcome = engine.run_task(task, directory, resume=resume, progress=c.progress,
                            stop_at=stop_after_round)
  summary = report.summarize(name, method, c, outcome.records)
  if is_primary():
    write_json(os.path.join(directory, "summary.json"), summary)
  return summary


def _traffic_record(t: comm.Traffic, fp32: comm.Traffic) -> dict[str, Any]:
  return {"up_bytes": t.up_bytes, "down_bytes": t.down_bytes, "total_bytes": t.total_bytes,
          "up": t.up, "down": t.down, "fp32_total_bytes": fp32.total_bytes}


def _starting_point(config: FederatedConfig, train: pdata.ImageDataset,
                    input_shape: tuple[int, ...]) -> fedge.Start:
  """Random initialization, ``--init-from`` or ``--client-from`` (see :mod:`.edge`)."""
  if not (config.client_from or config.init_from):
    model = models.get_model(config.arch, num_classes=train.num_classes)
    return fedge.Start(models.init_variables(model, jax.random.key(config.seed), input_shape),
                       models.FullPrecision(), None, {"weights": f"random (seed {config.seed})"})
  if config.init_from:
    start = fedge.load_start(config.init_from, config.arch, train.num_classes)
  else:
    start = fedge.load_compressed(config.client_from, config.arch, train.num_classes,
                                  train.images[:128], config.client_weights)
  _check_validation_split(config, start.meta)
  return start


def _check_validation_split(config: FederatedConfig, meta: dict) -> None:
  """UserError if pretrained weights saw this run's validation images in training."""
  trained = meta["config"]
  same_data = (trained["data"] == config.data or (
      os.path.exists(trained["data"]) and os.path.exists(config.data)
      and os.path.samefile(trained["data"], config.data)))
  if same_data and (trained["val_size"], trained["seed"]) != (config.val_size, config.seed):
    flag = "--client-from" if config.client_from else "--init-from"
    raise UserError(f"the {flag} weights were trained with --val-size={trained['val_size']} "
                    f"--seed={trained['seed']}; this run would validate on images they were "
                    f"trained on: pass --val-size {trained['val_size']} --seed {trained['seed']}")


def setup_run(config: FederatedConfig, print_fn: Callable[[str], None] = print) -> Setup:
  """Data, partition, mesh, model, optimizer and steps shared by every method."""
  spec = models.get_spec(config.arch)  # (FederatedConfig checked --cut against --arch)
  needs_split = any(m in SPLIT_METHODS for m in config.method_list)
  m = fpart.participants_per_round(config.clients, config.participation)
  mesh = clients_mesh(m, config.devices)
  train, val, parts = load_client_data(config, spec.input_shape)
  hist = fpart.label_histogram(train.labels, parts, train.num_classes)
  print_fn(f"{config.partition} partition of {len(train)} training images over "
           f"{config.clients} clients ({m} per round, {mesh.size} devices):\n"
           + fpart.format_histogram(hist, train.class_names))
  start = _starting_point(config, train, spec.input_shape)
  if start.meta is None:
    mean, std = pdata.channel_stats(train.images)
  else:  # the weights were trained on inputs normalized this way
    mean, std = (np.asarray(start.meta["normalization"][k], np.float32) for k in ("mean", "std"))
  model = models.get_model(config.arch, num_classes=train.num_classes, quantizer=start.quantizer)
  split = split_model(model, config.cut) if needs_split else None
  variables = jax.device_get(start.variables)  # on the host: each method copies it to the mesh
  edge = None
  if split is not None:
    edge = fedge.edge_cost(split, models.model_structure(model, spec.input_shape), variables)
  mean_j, std_j = jnp.asarray(mean), jnp.asarray(std)
  meta = {"config": config.to_dict(), "class_names": list(train.class_names),
          "normalization": {"mean": mean.tolist(), "std": std.tolist()},
          "client_sizes": [len(p) for p in parts], "label_histogram": hist.tolist(),
          "num_train": len(train), "num_val": len(val), "start": start.info}
  return Setup(
      config=config, train=train, val=val, parts=parts, mesh=mesh, model=model, split=split,
      variables=variables, edge=edge,
      tx=optim.sgd_nesterov(1.0, config.momentum, config.weight_decay),
      schedule=optim.make_schedule(config.schedule, config.lr, config.rounds * config.local_steps),
      preprocess=lambda key, x: pdata.normalize(pdata.augment(key, x), mean_j, std_j),
      eval_step=jit_eval_step(model, lambda x: pdata.normalize(x, mean_j, std_j)), meta=meta)


def run_federated(config: FederatedConfig, *, stop_after_round: int | None = None,
                  print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains every method of ``config`` and writes the report to ``config.workdir``.

  On several hosts, call :func:`picpq_jax.utils.initialize_if_multihost` first (the
  `picpq` command does, for every subcommand).

  Args:
    config: the run's options.
    stop_after_round: stop each method after this round as if interrupted (its
      checkpoint stands; ``--resume`` continues); for tests and split sessions.
    print_fn: where the partition table and the results table go.

  Returns:
    The results (also ``workdir/results.json``): config, partition, and per run its
    accuracy per round and bytes communicated.
  """
  t_start = time.time()
  workdir = engine.open_workdir(config)
  setup = setup_run(config, print_fn)
  if is_primary():
    workdir.write_config()
  runs = {}
  for method in config.method_list:
    summary = train_method(setup, method, stop_after_round, workdir.resuming)
    runs[summary["name"]] = summary
  results = {
      "config": config.to_dict(), "num_train": len(setup.train), "num_val": len(setup.val),
      "client_sizes": setup.meta["client_sizes"], "label_histogram": setup.meta["label_histogram"],
      "class_names": setup.meta["class_names"],
      "devices": f"{setup.mesh.size} x {jax.devices()[0].device_kind}",
      "processes": jax.process_count(), "runs": runs, "wall_time_s": time.time() - t_start,
      "start": setup.meta["start"],
  }
  if setup.edge is not None:
    results["edge"] = {k: v for k, v in setup.edge.items() if k != "client_sent"}
  if is_primary():
    workdir.write_json("results.json", results)
    write_atomic(workdir.file("report.md"), report.markdown(results))
    if config.plot:
      report.plot(results, os.path.join(config.workdir, "plot.png"))
  print_fn(report.table(results))
  return results
