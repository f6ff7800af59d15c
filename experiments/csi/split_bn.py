"""The split CRNet's saved checkpoint, evaluated outside the run.

The grid's record says split CRNet CR 4 ends at +1.41 dB while its training loss
falls. This loads ``run_grid.py``'s newest split checkpoint (8 UEs, seed-1 data) and
evaluates every UE's test set through its own encoder and the shared decoder three
ways: eval-mode batch norm (running statistics, as the run's evaluation), the
decoder's batch norm in train mode on each UE's test batch (per-UE statistics, as
the BTS normalizes each UE's micro-batch in training), and eval mode on the training
set. (CR 4: -2.83, -2.56 and -6.58 dB. The run's +1.41 dB was wrong: its evaluation
program computed wrong reconstructions with the encoders sharded over 'clients' on the
2-device CPU mesh; it now runs on one device, see csi.methods.reconstruct_program.)
Usage::

  PYTHONPATH=. python experiments/csi/split_bn.py --config crnet:4   # -> results/split_bn-crnet-cr4.json
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.csi.ue_compress import HERE, UES, load_split
from picpq_jax.csi import metrics
from picpq_jax.csi.domain import frequency_response
from picpq_jax.csi.quadriga import generate


def nmse_db(model, consts, enc_vars, dec_vars, data, decoder_train, with_rho=False):
  """NMSE (dB) over all UEs' ``data [U, N, 32, 32, 2]``, each through its own encoder
  (and rho when ``with_rho``)."""
  per, rho = [], []
  for u in range(len(data)):
    enc = {**consts["encoder"], **jax.tree.map(lambda a: a[u], enc_vars)}
    cw = model.encoder.apply(enc, jnp.asarray(data[u]), train=False)
    if decoder_train:
      x_hat, _ = model.decoder.apply(dec_vars, cw, train=True, mutable=["batch_stats"])
    else:
      x_hat = model.decoder.apply(dec_vars, cw, train=False)
    per.append(metrics.nmse_per_sample(jnp.asarray(data[u]), x_hat))
    rho.append(metrics.rho_per_sample(frequency_response(data[u]), x_hat))
  db = float(metrics.to_db(jnp.mean(jnp.concatenate(per))))
  return (db, float(jnp.mean(jnp.concatenate(rho)))) if with_rho else db


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="crnet:4")
  p.add_argument("--runs", default=os.path.join(HERE, "runs"))
  args = p.parse_args()
  arch, cr = args.config.split(":")
  x, _ = generate(UES, 320, 1, workers=2, progress=False)
  train, test = x[:, :-64], x[:, -64:]
  model, consts, enc_vars, dec_vars, step = load_split(args.runs, arch, int(cr))
  out = {"config": args.config, "split_round": step,
         "test_eval_bn_db_rho": nmse_db(model, consts, enc_vars, dec_vars, test, False, True),
         "test_per_ue_batch_bn_db": nmse_db(model, consts, enc_vars, dec_vars, test, True),
         "train_eval_bn_db": nmse_db(model, consts, enc_vars, dec_vars, train, False),
         "load": os.getloadavg()}
  print(out)
  json.dump(out, open(os.path.join(HERE, "results", f"split_bn-{arch}-cr{cr}.json"), "w"), indent=1)


if __name__ == "__main__":
  main()
