"""PIC-PQ on the UE side: the split method's trained encoders quantized, their cost and NMSE.

Takes the newest checkpoint of ``run_grid.py``'s split run (each UE's own encoder,
the shared BTS decoder), quantizes every UE's encoder to ``w_bits`` with LSQ
(:func:`picpq_jax.csi.edge.quantize_encoder`, calibrated on the UE's training CSI),
evaluates the test NMSE/rho over all UEs (each through its own encoder, the float
decoder unchanged), then fine-tunes each encoder for ``--steps`` steps through the
frozen decoder (:func:`~picpq_jax.csi.edge.finetune_encoder`, on the UE's training
CSI only) and evaluates again. Costs from :func:`~picpq_jax.csi.edge.encoder_cost`.
Usage::

  PYTHONPATH=. python experiments/csi/ue_compress.py --config csinet:4 --bits 8,4,2

Writes ``results/ue_compress-<arch>-cr<cr>.json`` and ``.md``.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax.csi import edge, metrics
from picpq_jax.csi.domain import frequency_response
from picpq_jax.csi.methods import constants, init_state
from picpq_jax.csi.models import get_csi_model, init_csi_variables
from picpq_jax.csi.quadriga import generate
from picpq_jax.csi.run import ADAM
from picpq_jax.engine.checkpoints import Checkpoints

HERE = os.path.dirname(os.path.abspath(__file__))
UES = 8  # the grid's


def load_split(runs: str, arch: str, cr: int, suffix: str = ""):
  """``(model, encoder variables stacked [U], decoder variables, round)`` of the grid's
  split run in ``runs/<arch>-cr<cr><suffix>`` (constant collections from a fresh init)."""
  model = get_csi_model(arch, cr)
  variables = init_csi_variables(model, jax.random.key(0))
  consts = constants(variables)
  ckpt = Checkpoints(os.path.join(runs, f"{arch}-cr{cr}{suffix}", "split", "checkpoints"))
  try:
    state, _, step = ckpt.restore_newest(init_state("split", variables, ADAM, UES),
                                         set_aside=False)
  finally:
    ckpt.close()
  enc, dec = state.parts["encoders"], state.parts["decoder"]
  enc_vars = {"params": enc.params, "batch_stats": enc.batch_stats}
  return model, consts, enc_vars, dec.variables(consts["decoder"]), step


def evaluate(x_hat: np.ndarray, test: np.ndarray) -> dict:
  x, x_hat = test.reshape(-1, 32, 32, 2), np.concatenate(x_hat)
  return {"nmse_db": float(metrics.nmse_db(x, x_hat)),
          "rho": float(metrics.rho(frequency_response(x), x_hat))}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="csinet:4")
  p.add_argument("--bits", default="8,4,2")
  p.add_argument("--steps", type=int, default=50, help="fine-tune steps per UE encoder")
  p.add_argument("--conv-bits", type=int, default=None,
                 help="the conv layers' weight bits (default: --bits, like the dense layer)")
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--runs", default=os.path.join(HERE, "runs"), help="run_grid.py's workdirs")
  p.add_argument("--suffix", default="", help="the run_grid.py --suffix of the split run")
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  args = p.parse_args()
  arch, cr = args.config.split(":")
  cr = int(cr)
  # The grid's data and split: seed 1, 8 UEs x 320 samples, the last 64 held out.
  x, _ = generate(UES, 320, 1, workers=2, progress=False)
  train, test = x[:, :-64], x[:, -64:]
  model, consts, enc_vars, dec_vars, step = load_split(args.runs, arch, cr, args.suffix)
  ues = train.shape[0]
  one = lambda u: jax.tree.map(lambda a: a[u], enc_vars)
  float_enc = model.encoder
  rows = {}
  t0 = time.time()
  x_hat = [np.asarray(edge.reconstruct(float_enc, model.decoder, {**consts["encoder"], **one(u)},
                                       dec_vars, jnp.asarray(test[u]))) for u in range(ues)]
  rows["float32"] = {"bits": 32, **edge.encoder_cost(edge.quantized_encoder(arch, cr)),
                     "ptq": evaluate(x_hat, test), "qat": None}
  for bits in (int(b) for b in args.bits.split(",")):
    ptq, qat = [], []
    for u in range(ues):
      enc, qv = edge.quantize_encoder(arch, cr, one(u), bits, jnp.asarray(train[u]),
                                      conv_w_bits=args.conv_bits)
      ptq.append(np.asarray(edge.reconstruct(enc, model.decoder, qv, dec_vars, jnp.asarray(test[u]))))
      tuned = edge.finetune_encoder(enc, model.decoder, qv, dec_vars, train[u], args.steps, 16,
                                    args.lr, seed=u)
      qat.append(np.asarray(edge.reconstruct(enc, model.decoder, tuned, dec_vars,
                                             jnp.asarray(test[u]))))
    rows[f"w{bits}"] = {"bits": bits, **edge.encoder_cost(enc, qv["quant"]),
                        "ptq": evaluate(ptq, test), "qat": evaluate(qat, test)}
    print(bits, rows[f"w{bits}"], flush=True)
  out = {"config": {"arch": arch, "cr": cr, "split_round": step, "finetune_steps": args.steps,
                    "conv_bits": args.conv_bits,
                    "finetune_lr": args.lr, "batch": 16, "activations": "float32"},
         "rows": rows, "wall_s": time.time() - t0, "load": os.getloadavg()}
  name = os.path.join(args.out, f"ue_compress-{arch}-cr{cr}"
                      + (f"-conv{args.conv_bits}" if args.conv_bits else ""))
  json.dump(out, open(name + ".json", "w"), indent=1)
  base = rows["float32"]
  conv = f"the conv at {args.conv_bits} bits, " if args.conv_bits else ""
  lines = [f"UE encoder of the split method, {arch} CR {cr} (after {step} rounds), weights at "
           f"k bits with LSQ ({conv}'w<k>'), activations float; test NMSE over 8 UEs x 64 samples. "
           f"Fine-tune: {args.steps} steps x batch 16 per UE through the frozen decoder, "
           f"Adam {args.lr}. {out['wall_s']:.0f} s wall, load {out['load'][0]:.0f}.", "",
           "| weights | FLOPs (MACs) | params | BOPs | bytes | BOPs vs float | NMSE PTQ (dB) "
           "| NMSE fine-tuned (dB) | rho fine-tuned |", "|---|---|---|---|---|---|---|---|---|"]
  for name_, r in rows.items():
    qat = r["qat"] or r["ptq"]
    lines.append(f"| {name_} | {r['flops']:,.0f} | {r['params']:,.0f} | {r['bops']:,.0f} | "
                 f"{r['bytes']:,.0f} | {base['bops'] / r['bops']:.1f}x | {r['ptq']['nmse_db']:.2f} | "
                 f"{qat['nmse_db']:.2f} | {qat['rho']:.4f} |")
  open(name + ".md", "w").write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
