"""``run_csi``: the run behind ``picpq csi``.

Flat, top to bottom: check the options against the model (before anything is
written), load or generate the per-UE CSI and hold out each UE's last samples as its
test set, then train each requested method for ``rounds`` rounds on the run engine
(a checkpoint per round, exact resume), evaluating NMSE and rho on the test set and
counting each UE's bytes every round; with ``--ue-bits``, quantize every split
method's trained UE encoders (also on the engine, one step per UE); and finally write
``results.json``, ``report.md`` and ``plot.png``.

Every random draw derives from ``config.seed`` and the round number (the data, each
UE's batches, the initialization), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from picpq_jax import engine
from picpq_jax.csi import metrics, methods, traffic
from picpq_jax.csi.config import SPLIT_METHODS, CsiConfig
from picpq_jax.csi.domain import frequency_response
from picpq_jax.csi.models import codeword_size, decoder_stages, get_csi_model, init_csi_variables
from picpq_jax.errors import UserError
from picpq_jax.federated.distributed import AXIS
from picpq_jax.federated.partition import client_batch_indices
from picpq_jax.train import optim
from picpq_jax.utils import format_table, is_primary, plot_rounds_and_bytes, write_atomic

ADAM = methods.ADAM
LABELS = {"centralized": "Centralized", "fedavg": "FedAvg (whole autoencoder)",
          "split": "Split (own encoders)", "pipeline": "Split + BTS pipeline"}


def load_csi(config: CsiConfig) -> tuple[np.ndarray, np.ndarray, dict]:
  """``(train [U, n, 32, 32, 2], test [U, m, 32, 32, 2], info)``: each UE's samples, the
  last ``test_per_ue`` of them held out."""
  u, s = config.ues, config.samples_per_ue
  if config.data == "quadriga":
    from picpq_jax.csi.quadriga import generate
    x, scenarios = generate(u, s, config.seed, cache_dir=config.cache_dir,
                            workers=config.workers or None, progress=config.progress)
    info = {"data": "quadriga-lib IEEE TGn indoor, one scenario per UE",
            "scenarios": [sc.__dict__ for sc in scenarios]}
  else:
    from picpq_jax.csi.mat import load_ht
    ht = load_ht(config.data)
    if len(ht) < u * s:
      raise UserError(f"{config.data} holds {len(ht)} samples but --ues {u} x "
                      f"--samples-per-ue {s} = {u * s} are needed: lower either")
    x = ht[:u * s].reshape(u, s, *ht.shape[1:])
    info = {"data": f"{config.data} (consecutive samples split evenly over the UEs)"}
  return x[:, :-config.test_per_ue], x[:, -config.test_per_ue:], info


def check_model(config: CsiConfig):
  """The autoencoder, after checking CR and stages (one-line UserErrors)."""
  codeword_size(config.cr)
  model = get_csi_model(config.arch, config.cr)
  if "pipeline" in config.method_list:
    decoder_stages(model.decoder, config.stages, codeword_size(config.cr))
  return model


def round_traffic(config: CsiConfig, method: str, variables: dict, num_train: int,
                  r: int) -> traffic.Traffic:
  """One UE's bytes in round ``r`` (0-based) of ``method``."""
  c = config
  if method == "fedavg":
    return traffic.fedavg_traffic(traffic.exchanged(variables))
  if method == "centralized":
    return traffic.centralized_traffic(num_train, c.target_bits, first_round=r == 0)
  sync = c.encoder_sync and (r + 1) % c.encoder_sync == 0
  return traffic.split_traffic(codeword_size(c.cr), c.batch_size, c.local_steps, c.bits,
                               c.target_bits,
                               traffic.exchanged(variables, "encoder") if sync else None)


def evaluate(reconstruct: Callable, method: str, state: methods.CsiState, consts: dict,
             test: np.ndarray, hf: np.ndarray) -> dict[str, float]:
  """NMSE (dB) and rho over every UE's test samples, each UE through its own encoder."""
  enc, dec = methods.ue_variables(method, state, test.shape[0])
  x_hat = np.asarray(reconstruct(enc, dec, consts, jnp.asarray(test)))
  x, x_hat = test.reshape(-1, *test.shape[2:]), x_hat.reshape(-1, *test.shape[2:])
  return {"nmse_db": float(metrics.to_db(jnp.mean(metrics.nmse_per_sample(x, x_hat)))),
          "rho": float(metrics.rho(hf, x_hat))}


@functools.lru_cache(maxsize=8)
def _programs(method: str, model, mesh, encoder_sync: int) -> tuple[Callable, Callable]:
  """``(round, reconstruct)`` programs, shared by runs of the same setting in one process
  (a resumed run in the same process compiles nothing again)."""
  return (methods.round_program(method, model, ADAM, mesh, encoder_sync),
          methods.reconstruct_program(model))


def learning_rates(config: CsiConfig) -> optax.Schedule:
  """Global local-step index -> Adam learning rate (``--schedule`` over all
  ``rounds * local_steps`` steps; the warm-up counted in rounds)."""
  c = config
  return optim.make_schedule(c.schedule, c.lr, c.rounds * c.local_steps,
                             warmup_steps=c.warmup_rounds * c.local_steps, end_lr=c.end_lr)


def schedule_text(config: dict[str, Any]) -> str:
  """``config``'s (a ``CsiConfig`` as a dict) schedule in words, for reports."""
  if config.get("schedule", "constant") == "constant":
    return "constant"
  return (f"cosine to {config['end_lr']:g} after {config['warmup_rounds']} warm-up rounds")


def train_method(config: CsiConfig, method: str, model, variables: dict, train: np.ndarray,
                 test: np.ndarray, resume: bool, stop_after_round: int | None) -> dict[str, Any]:
  """Trains one method on the engine; returns its summary."""
  c = config
  mesh = methods.method_mesh(method, c.ues, c.stages)
  consts = jax.device_put(methods.constants(variables), NamedSharding(mesh, P()))
  init = methods.init_state(method, variables, ADAM, c.ues)
  template = jax.device_put(init, NamedSharding(mesh, P()))
  run_round, reconstruct = _programs(method, model, mesh, c.encoder_sync)
  hf = frequency_response(test.reshape(-1, *test.shape[2:]))
  n, weights = train.shape[1], jnp.full(c.ues, float(train.shape[1]))
  schedule = learning_rates(c)
  bits, target_bits = jnp.int32(c.bits), jnp.int32(c.target_bits)

  def step(state, r, index):
    del index  # = r
    t0 = time.time()
    rows = np.stack([client_batch_indices(np.arange(n), c.seed, u, r, c.local_steps,
                                          c.batch_size) for u in range(c.ues)])
    x = jax.device_put(train[np.arange(c.ues)[:, None, None], rows], NamedSharding(mesh, P(AXIS)))
    lrs = optim.step_rates(schedule, r * c.local_steps, c.local_steps)
    state, loss = run_round(state, consts, x, weights, lrs, bits, target_bits)
    t = round_traffic(c, method, variables, n, r)
    record = {"round": r + 1, "loss": float(loss), "lr": float(lrs[-1]), "up_bytes": t.up_bytes,
              "down_bytes": t.down_bytes, "total_bytes": t.total_bytes, "up": t.up, "down": t.down}
    if (r + 1) % c.eval_every == 0 or r + 1 == c.rounds:
      record.update(evaluate(reconstruct, method, state, consts, test, hf))
    record["round_time_s"] = time.time() - t0
    return state, record

  task = engine.Task(init=lambda: init, template=template, total=c.rounds,
                     batches=itertools.count, step=step, keep=c.keep_checkpoints,
                     meta={"method": method, "arch": c.arch, "cr": c.cr}, label=method,
                     unit="round")
  directory = os.path.join(os.path.abspath(c.workdir), method)
  outcome = engine.run_task(task, directory, resume=resume, progress=c.progress,
                            stop_at=stop_after_round)
  summary = summarize(method, c, outcome.records)
  if c.ue_bit_widths and method in SPLIT_METHODS and outcome.step == c.rounds:
    summary["ue_compression"] = compress_ues(c, model, variables, outcome.state, train, test,
                                             directory, resume)
  return summary


def compress_ues(config: CsiConfig, model, variables: dict, state: methods.CsiState,
                 train: np.ndarray, test: np.ndarray, directory: str, resume: bool) -> dict:
  """PIC-PQ on the UE side (``--ue-bits``), on the engine: one step per UE.

  Step ``u`` quantizes UE ``u``'s trained encoder with LSQ at the conv/dense weight
  bits (:func:`~picpq_jax.csi.edge.quantize_encoder`, calibrated on its training CSI),
  tests it through the BTS decoder, fine-tunes it for ``ue_finetune_steps`` steps
  through the frozen decoder (:func:`~picpq_jax.csi.edge.finetune_encoder`) and tests
  again; the state holds every UE's quantized variables (checkpointed per UE). Returns
  the encoder's cost (:func:`~picpq_jax.csi.edge.encoder_cost`) float and quantized, and
  NMSE/rho over all UEs' test samples after quantization and after the fine-tune.
  """
  from picpq_jax.csi import edge
  c, bits = config, config.ue_bit_widths
  consts = methods.constants(variables)
  encs, dec = methods.ue_variables("split", state, c.ues)
  dec = {**consts["decoder"], **dec}
  one = lambda u: {**consts["encoder"], **jax.tree.map(lambda a: a[u], encs)}
  quantize = lambda u: edge.quantize_encoder(c.arch, c.cr, one(u), bits["dense"],
                                             jnp.asarray(train[u]), conv_w_bits=bits["conv"])
  encoder, first = quantize(0)
  init = jax.tree.map(lambda a: jnp.stack([a] * c.ues), first)

  def measure(enc_vars, u):
    x_hat = edge.reconstruct(encoder, model.decoder, enc_vars, dec, jnp.asarray(test[u]))
    hf = frequency_response(test[u])
    return (float(jnp.sum(metrics.nmse_per_sample(test[u], x_hat))),
            float(jnp.sum(metrics.rho_per_sample(hf, x_hat))))

  def step(stacked, u, index):
    del index  # = u
    _, ptq = quantize(u)
    tuned = edge.finetune_encoder(encoder, model.decoder, ptq, dec, train[u],
                                  c.ue_finetune_steps, c.batch_size, c.lr, seed=c.seed + u)
    stacked = jax.tree.map(lambda a, b: a.at[u].set(b), stacked, tuned)
    (ptq_nmse, ptq_rho), (nmse, rho) = measure(ptq, u), measure(tuned, u)
    return stacked, {"ue": u, "samples": len(test[u]), "ptq_nmse_sum": ptq_nmse,
                     "ptq_rho_sum": ptq_rho, "nmse_sum": nmse, "rho_sum": rho}

  task = engine.Task(init=lambda: init, template=init, total=c.ues, batches=itertools.count,
                     step=step, keep=c.keep_checkpoints, label="UE encoders", unit="UE",
                     meta={"ue_bits": bits, "finetune_steps": c.ue_finetune_steps})
  records = engine.run_task(task, os.path.join(directory, "ue_compression"), resume=resume,
                            progress=c.progress).records
  records = [r for r in records if "ue" in r]
  n = sum(r["samples"] for r in records)
  total = lambda key: sum(r[key] for r in records) / n
  return {"bits": bits, "finetune_steps": c.ue_finetune_steps,
          "float_cost": edge.encoder_cost(encoder), "cost": edge.encoder_cost(encoder, first["quant"]),
          "ptq": {"nmse_db": float(metrics.to_db(total("ptq_nmse_sum"))), "rho": total("ptq_rho_sum")},
          "finetuned": {"nmse_db": float(metrics.to_db(total("nmse_sum"))), "rho": total("rho_sum")}}


def summarize(method: str, config: CsiConfig, records: list[dict]) -> dict[str, Any]:
  """Final NMSE and rho, bytes per UE per round (last round) and in total (all UEs,
  all rounds), the measured time per round and the curve with cumulative bytes."""
  rounds = [r for r in records if "loss" in r]
  evals = {r["round"]: r for r in records if "nmse_db" in r}
  curve, total = [], 0
  for r in rounds:
    total += r["total_bytes"] * config.ues
    e = evals.get(r["round"], {})
    curve.append({"round": r["round"], "loss": r["loss"], "nmse_db": e.get("nmse_db"),
                  "rho": e.get("rho"), "cumulative_bytes": total})
  last = evals[max(evals)] if evals else {}
  return {"method": method, "label": LABELS[method], "rounds_done": len(rounds),
          "nmse_db": last.get("nmse_db"), "rho": last.get("rho"),
          "bytes_per_ue_round": rounds[-1]["total_bytes"] if rounds else None,
          "up_per_ue_round": rounds[-1]["up"] if rounds else None,
          "down_per_ue_round": rounds[-1]["down"] if rounds else None,
          "total_bytes": total,
          "mean_round_time_s": float(np.mean([r["round_time_s"] for r in rounds[1:]]))
          if len(rounds) > 1 else None, "curve": curve}


def table(results: dict[str, Any]) -> str:
  """The results as a text table: method, NMSE, rho, kB per UE per round, MB in total."""
  return format_table(
      (s["label"], f"NMSE {s['nmse_db']:.2f} dB, rho {s['rho']:.4f}, "
       f"{s['bytes_per_ue_round'] / 1e3:,.1f} kB/UE/round, {s['total_bytes'] / 1e6:,.2f} MB total")
      for s in results["runs"].values())


def markdown(results: dict[str, Any]) -> str:
  """``report.md``."""
  c = results["config"]
  lines = [f"# CSI feedback: {c['arch']} at CR {c['cr']}, {c['ues']} UEs", "",
           f"Data: {results['info']['data']}; {results['num_train_per_ue']} training and "
           f"{c['test_per_ue']} test samples per UE. {c['rounds']} rounds of "
           f"{c['local_steps']} local steps, batch {c['batch_size']} per UE, Adam "
           f"{c['lr']} ({schedule_text(c)}); codewords at {c['bits']} bits, uploaded targets at "
           f"{c['target_bits']} bits; pipeline over {c['stages']} stages.", "",
           "| method | NMSE (dB) | rho | bytes per UE per round | total bytes (all UEs) |",
           "|---|---|---|---|---|"]
  for s in results["runs"].values():
    nmse = f"{s['nmse_db']:.2f}" if s["nmse_db"] is not None else "-"
    rho = f"{s['rho']:.4f}" if s["rho"] is not None else "-"
    lines.append(f"| {s['label']} | {nmse} | {rho} | {s['bytes_per_ue_round']:,} | "
                 f"{s['total_bytes']:,} |")
  lines += ["", "NMSE per round:", "", "| round | " + " | ".join(results["runs"]) + " |",
            "|---" * (len(results["runs"]) + 1) + "|"]
  for i in range(max(len(s["curve"]) for s in results["runs"].values())):
    cells = [f"{s['curve'][i]['nmse_db']:.2f}" if i < len(s["curve"])
             and s["curve"][i]["nmse_db"] is not None else "-" for s in results["runs"].values()]
    lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
  for s in results["runs"].values():
    if "ue_compression" in s:
      lines += ["", *ue_compression_table(s["label"], s["nmse_db"], s["rho"], s["ue_compression"])]
  if c["plot"]:
    lines += ["", "![NMSE vs round and vs bytes](plot.png)"]
  return "\n".join(lines) + "\n"


def ue_compression_table(label: str, nmse_db: float, rho: float, q: dict) -> list[str]:
  """Markdown lines: a split method's UE encoder float and quantized (``--ue-bits``)."""
  f, k = q["float_cost"], q["cost"]
  bits = f"conv {q['bits']['conv']} / dense {q['bits']['dense']} bits"
  return [f"UE encoders of {label}, weights quantized with LSQ ({bits}; activations float), "
          f"fine-tuned {q['finetune_steps']} steps through the frozen decoder:", "",
          "| UE encoder | FLOPs (MACs) | params | BOPs | bytes | NMSE (dB) | rho |",
          "|---|---|---|---|---|---|---|",
          f"| float32 | {f['flops']:,.0f} | {f['params']:,.0f} | {f['bops']:,.0f} | "
          f"{f['bytes']:,.0f} | {nmse_db:.2f} | {rho:.4f} |",
          f"| {bits}, post-training | {k['flops']:,.0f} | {k['params']:,.0f} | {k['bops']:,.0f} | "
          f"{k['bytes']:,.0f} | {q['ptq']['nmse_db']:.2f} | {q['ptq']['rho']:.4f} |",
          f"| {bits}, fine-tuned | {k['flops']:,.0f} | {k['params']:,.0f} | {k['bops']:,.0f} | "
          f"{k['bytes']:,.0f} | {q['finetuned']['nmse_db']:.2f} | {q['finetuned']['rho']:.4f} |"]


def plot(results: dict[str, Any], path: str) -> None:
  """``plot.png``: test NMSE against rounds and against cumulative bytes."""
  curves = {s["label"]: (s["curve"], "-") for s in results["runs"].values()}
  plot_rounds_and_bytes(curves, path, "nmse_db", "test NMSE (dB)", "NMSE",
                        bytes_label="all UEs, cumulative")


def run_csi(config: CsiConfig, *, stop_after_round: int | None = None,
            print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains every method of ``config`` from the same initial weights and writes the
  report to ``config.workdir``; returns the results (also ``results.json``)."""
  t_start = time.time()
  model = check_model(config)
  workdir = engine.open_workdir(config)
  train, test, info = load_csi(config)
  variables = init_csi_variables(model, jax.random.key(config.seed))
  if is_primary():
    workdir.write_config()
  runs = {m: train_method(config, m, model, variables, train, test, workdir.resuming,
                          stop_after_round) for m in config.method_list}
  results = {"config": config.to_dict(), "info": info, "num_train_per_ue": train.shape[1],
             "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
             "runs": runs, "wall_time_s": time.time() - t_start}
  if is_primary():
    workdir.write_json("results.json", results)
    write_atomic(workdir.file("report.md"), markdown(results))
    if config.plot:
      plot(results, workdir.file("plot.png"))
  print_fn(table(results))
  return results
