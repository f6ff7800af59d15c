"""CSI feedback at CPU scale: the four methods on quadriga indoor data, 8 UEs.

Runs ``picpq csi`` (its Python API, the same engine) for each (arch, CR) of the grid,
measures the decoder's per-stage and the encoder's compute times on this machine, and
writes ``results/grid.json`` with NMSE, rho, bytes and the round-time model's
numbers. Two simulated devices: the pipeline's two stages (the UEs then share one
'clients' device under vmap; more simulated devices on 2 cores only repeat the
replicated BTS work). Usage::

  XLA_FLAGS=--xla_force_host_platform_device_count=2 PYTHONPATH=. \
      python experiments/csi/run_grid.py [--configs csinet:4,crnet:4,csinet:16,crnet:16] [--rounds 60]
"""

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from picpq_jax.csi import get_csi_model, init_csi_variables, traffic
from picpq_jax.csi.config import CsiConfig
from picpq_jax.csi.models import codeword_size, decoder_stages, stage_variables
from picpq_jax.csi.pipeline import mse
from picpq_jax.csi.run import run_csi, schedule_text, ue_compression_table

HERE = os.path.dirname(os.path.abspath(__file__))
# seed 1: experiments/csi/plateau.py chose the decoder's output init on seed 0's data,
# so this grid's test set is unseen. --rounds sizes every method of a config equally.
COMMON = dict(ues=8, samples_per_ue=320, test_per_ue=64, local_steps=5, batch_size=16,
              lr=3e-3, target_bits=8, stages=2, workers=2, progress=False, eval_every=5,
              plot=True, seed=1)
# Published COST2100 indoor NMSE (dB) of the centralized models (other data: for scale only).
PUBLISHED_DB = {"csinet": {4: -17.36, 16: -8.65, 32: -6.24, 64: -5.84},
                "crnet": {4: -26.99, 16: -11.35, 32: -8.93, 64: -6.49}}
UPLINK_BPS, DOWNLINK_BPS = 10e6, 50e6  # assumed link rates per UE for the round-time model


def median_time(fn, *args, repeat=20):
  """Median seconds of ``repeat`` calls of ``fn(*args)`` after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeat):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure(arch, cr, batch):
  """Per-piece forward and forward+backward seconds of the decoder on one micro-batch,
  the encoder's forward and backward, and a whole-autoencoder step (Adam)."""
  model = get_csi_model(arch, cr)
  v = init_csi_variables(model, jax.random.key(0))
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, 32, 32, 2)), jnp.float32)
  dec_v = {c: t["decoder"] for c, t in v.items()}
  h = model.encoder.apply({c: t["encoder"] for c, t in v.items()}, x)
  pieces_f, pieces_b = [], []
  for i in range(len(model.decoder.pieces())):
    stage = model.decoder.clone(span=(i, i + 1))
    sv = stage_variables(dec_v, model.decoder, (i, i + 1))
    f = jax.jit(lambda p, a: stage.apply({**sv, "params": p}, a, train=True, mutable=["batch_stats"])[0])
    g = jax.jit(jax.grad(lambda p, a: jnp.sum(f(p, a)), argnums=(0, 1)))
    tf, tb = median_time(f, sv["params"], h), median_time(g, sv["params"], h)
    pieces_f.append(tf)
    pieces_b.append(max(tb - tf, 0.0))
    h = f(sv["params"], h)
  enc_v = {c: t["encoder"] for c, t in v.items()}
  ef = jax.jit(lambda p: model.encoder.apply({**enc_v, "params": p}, x, train=True, mutable=["batch_stats"])[0])
  eg = jax.jit(jax.grad(lambda p: jnp.sum(ef(p))))
  tx = optax.adam(1e-3)
  opt = tx.init(v["params"])

  @jax.jit
  def step(p, o):
    g = jax.grad(lambda q: mse(model.apply({**v, "params": q}, x, train=True, mutable=["batch_stats"])[0], x))(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o
  t_ef, t_eg = median_time(ef, enc_v["params"]), median_time(eg, enc_v["params"])
  return {"piece_forward": pieces_f, "piece_backward": pieces_b, "ue_forward": t_ef,
          "ue_backward": max(t_eg - t_ef, 0.0), "ue_step": median_time(step, v["params"], opt)}


def round_model(arch, cr, times, variables_shapes):
  """Modelled seconds per round for each method and S = 1, 2, 4 stages.

  ``split_S{S}``: stages cut by :func:`decoder_stages` (balanced counted MACs, what the
  pipeline runs); ``split_S2_by_count``: the earlier cut by piece count (2 pieces each);
  ``split_S2_by_time``: balanced by the measured times (the best any cut can do).
  """
  c = COMMON
  out, spans_of = {}, {}
  decoder = get_csi_model(arch, cr).decoder
  pieces = len(times["piece_forward"])
  piece_s = [f + b for f, b in zip(times["piece_forward"], times["piece_backward"])]
  split_t = traffic.split_traffic(codeword_size(cr), c["batch_size"], c["local_steps"], 32,
                                  c["target_bits"])
  cuts = [(f"split_S{s}", s, None) for s in (1, 2, 4)]
  cuts += [("split_S2_by_count", 2, (1,) * pieces), ("split_S2_by_time", 2, piece_s)]
  for name, stages, costs in cuts:
    spans = decoder_stages(decoder, stages, codeword_size(cr), costs)
    f = tuple(sum(times["piece_forward"][a:b]) for a, b in spans)
    b = tuple(sum(times["piece_backward"][a:b]) for a, b in spans)
    timing = traffic.Timing(times["ue_forward"], times["ue_backward"], times["ue_step"], f, b)
    method = "split" if stages == 1 else "pipeline"
    out[name] = traffic.round_time(method, timing, split_t, c["ues"],
                                   c["local_steps"], UPLINK_BPS, DOWNLINK_BPS)
    out[name]["spans"] = [list(span) for span in spans]
  timing = traffic.Timing(times["ue_forward"], times["ue_backward"], times["ue_step"],
                          (0.0,) * pieces, (0.0,) * pieces)
  out["fedavg"] = traffic.round_time("fedavg", timing,
                                     traffic.fedavg_traffic(traffic.exchanged(variables_shapes)),
                                     c["ues"], c["local_steps"], UPLINK_BPS, DOWNLINK_BPS)
  out["fedavg"]["spans"] = []
  return out


def render(grid):
  """``results/grid.md``: one table per (arch, CR), and the round-time model."""
  lines = []
  for item, g in grid.items():
    c = g["config"]
    fed = g["runs"].get("fedavg", {}).get("bytes_per_ue_round")
    arch, cr = c["arch"], c["cr"]
    lines += [f"### {item}: {arch} CR {cr} ({c['ues']} UEs x "
              f"{c['samples_per_ue'] - c['test_per_ue']} training samples, {c['rounds']} rounds x "
              f"{c['local_steps']} steps, batch {c['batch_size']}, Adam {c['lr']} "
              f"({schedule_text(c)}); {g['wall_s']:.0f} s wall, "
              f"load {g['load'][0]:.0f}; published centralized on COST2100: "
              f"{PUBLISHED_DB[arch][int(cr)]} dB)", "",
              "| method | NMSE (dB) | rho | bytes/UE/round | vs FedAvg | total bytes |",
              "|---|---|---|---|---|---|"]
    runs = dict(g["runs"])
    if "pipeline" not in runs and "split" in runs:  # equal to split by test (tests/csi)
      runs["pipeline"] = runs["split"] | {"label": "Split + BTS pipeline (= split, not rerun)"}
    for m, s in runs.items():
      ratio = f"{fed / s['bytes_per_ue_round']:.1f}x less" if fed and m in ("split", "pipeline") else ""
      lines.append(f"| {s['label']} | {s['nmse_db']:.2f} | {s['rho']:.4f} | "
                   f"{s['bytes_per_ue_round']:,} | {ratio} | {s['total_bytes']:,} |")
    for s in g["runs"].values():
      if "ue_compression" in s:
        lines += ["", *ue_compression_table(s["label"], s["nmse_db"], s["rho"], s["ue_compression"])]
    rm = g["round_model"]
    lines += ["", "Round-time model (s per round; per-stage times measured here, "
              f"{UPLINK_BPS / 1e6:.0f} Mbit/s up, {DOWNLINK_BPS / 1e6:.0f} Mbit/s down per UE):", "",
              "| | stages (pieces) | total | UE | links | BTS | of which bubble |",
              "|---|---|---|---|---|---|---|"]
    for k, v in rm.items():
      lines.append(f"| {k} | {v.get('spans', '')} | {v['total']:.4f} | {v['ue']:.4f} | "
                   f"{v['link']:.4f} | {v['bts']:.4f} | {v['bubble']:.4f} |")
    lines.append("")
  with open(os.path.join(HERE, "results", "grid.md"), "w") as f:
    f.write("\n".join(lines))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="csinet:4,crnet:4,csinet:16,crnet:16")
  parser.add_argument("--rounds", type=int, default=60)
  parser.add_argument("--methods", default="centralized,fedavg,split",
                      help="methods of every config (pipeline: see --pipeline-for)")
  parser.add_argument("--pipeline-for", default="",
                      help="configs that also train the pipelined method (equal to split by "
                      "test; its round-time numbers are modelled for every config)")
  parser.add_argument("--suffix", default="",
                      help="a separate run of each config: workdir runs/<arch>-cr<cr><suffix>, "
                      "key <arch>:<cr><suffix> in grid.json (e.g. a longer centralized run)")
  parser.add_argument("--schedule", default="constant",
                      help="learning-rate schedule (cosine: CRNet's reference recipe)")
  parser.add_argument("--warmup-rounds", type=int, default=0)
  parser.add_argument("--end-lr", type=float, default=0.0)
  parser.add_argument("--samples-per-ue", type=int, default=COMMON["samples_per_ue"],
                      help="CSI samples per UE, the last 64 held out (more training data)")
  parser.add_argument("--ue-bits", default="",
                      help="picpq csi --ue-bits: after training, quantize the split methods' "
                      "UE encoders (e.g. conv=8,dense=2) and report their cost and NMSE")
  parser.add_argument("--model-only", action="store_true",
                      help="recompute the round-time model of the configs in grid.json from "
                      "their stored per-piece times (no training, no timing)")
  args = parser.parse_args()
  out_path = os.path.join(HERE, "results", "grid.json")
  grid = json.load(open(out_path)) if os.path.exists(out_path) else {}
  if args.model_only:
    for item, g in grid.items():
      arch, cr = g["config"]["arch"], g["config"]["cr"]
      model = get_csi_model(arch, int(cr))
      shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 2)), train=False))
      g["round_model"] = round_model(arch, int(cr), g["times"], shapes)
    json.dump(grid, open(out_path, "w"), indent=1)
    render(grid)
    return
  for item in args.configs.split(","):
    arch, cr = item.split(":")
    workdir = os.path.join(HERE, "runs", f"{arch}-cr{cr}{args.suffix}")
    methods = args.methods + (",pipeline" if item in args.pipeline_for.split(",") else "")
    base, item = item, item + args.suffix
    config = CsiConfig(arch=arch, cr=int(cr), methods=methods,
                       workdir=workdir, resume=os.path.exists(os.path.join(workdir, "config.json")),
                       rounds=args.rounds, schedule=args.schedule,
                       warmup_rounds=args.warmup_rounds, end_lr=args.end_lr,
                       ue_bits=args.ue_bits,
                       **COMMON | {"samples_per_ue": args.samples_per_ue})
    t0 = time.time()
    results = run_csi(config)
    # a suffixed run reuses its config's measured times (the same model and batch)
    times = (grid[base]["times"] if args.suffix and base in grid
             else measure(arch, int(cr), COMMON["batch_size"]))
    model = get_csi_model(arch, int(cr))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 2)), train=False))
    command = "run_grid.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    # Re-read: another run_grid process may have written its configs meanwhile.
    grid = json.load(open(out_path)) if os.path.exists(out_path) else {}
    # Methods not rerun keep their earlier entry (each run names its command and load).
    runs = grid.get(item, {}).get("runs", {}) | {
        m: s | {"command": command, "load_end": os.getloadavg()} for m, s in results["runs"].items()}
    grid[item] = {"runs": runs, "command": command,
                  "times": times, "round_model": round_model(arch, int(cr), times, shapes),
                  "wall_s": time.time() - t0, "load": os.getloadavg(),
                  "devices": results["devices"], "config": results["config"]}
    with open(out_path + ".tmp", "w") as f:
      json.dump(grid, f, indent=1)
    os.replace(out_path + ".tmp", out_path)  # another process may read it meanwhile
    render(grid)
    print(item, "done in", time.time() - t0, "s; load", os.getloadavg(), flush=True)


if __name__ == "__main__":
  main()
