"""Why CRNet lags at CPU scale: screening of starts and learning-rate warm-up.

Centralized CRNet CR 4 on plateau.py's seed-0 data (8 UEs x 320 samples, last 64 per UE
held out), Adam, batch 16, test NMSE every ``--eval-every`` steps. A variant is
``name:lr:steps:warmup:head:merge1:merge2[:eps[:offset]]``: the learning rate rises linearly over
``warmup`` steps; ``head``/``merge1``/``merge2`` multiply the BN scale of the decoder's
head and of each CRBlock's merge conv at init; ``eps``: Adam's (default 1e-8);
``offset``: the head's BN shift starts at ``+offset`` and crblock2's merge BN shift at
``-offset`` (the residual stream then starts in LeakyReLU's linear part). Log in results/crnet_init.log.
Usage::

  PYTHONPATH=. python experiments/csi/crnet_init.py --variants drawn:3e-3:300:0:1:1:1,...
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from picpq_jax.csi import metrics
from picpq_jax.csi.methods import autoencoder_step, constants
from picpq_jax.csi.models import get_csi_model, init_csi_variables
from picpq_jax.csi.quadriga import generate
from picpq_jax.federated.steps import PartState


def scaled(variables, head, merge1, merge2, offset=0.0):
  """``variables`` with the decoder's head / merge BN scales multiplied (and shifts offset)."""
  v = jax.tree.map(lambda a: a, variables)
  d = v["params"]["decoder"]
  d["head"]["bn"]["scale"] = d["head"]["bn"]["scale"] * head
  d["head"]["bn"]["bias"] = d["head"]["bn"]["bias"] + offset
  d["crblock2"]["merge_conv1x1"]["bn"]["bias"] = d["crblock2"]["merge_conv1x1"]["bn"]["bias"] - offset
  for name, s in (("crblock1", merge1), ("crblock2", merge2)):
    d[name]["merge_conv1x1"]["bn"]["scale"] = d[name]["merge_conv1x1"]["bn"]["scale"] * s
  return v


def run(name, lr, steps, warmup, head, merge1, merge2, tr, te, eval_every, eps=1e-8, offset=0.0,
        batch=16):
  adam = optax.adam(1.0, eps=eps)
  model = get_csi_model("crnet", 4)
  v = scaled(init_csi_variables(model, jax.random.key(0), quiet=False), head, merge1, merge2,
             offset)
  consts = constants(v)["model"]
  part = PartState.create(v, adam)
  step = jax.jit(lambda p, x, lr: autoencoder_step(model, adam, p, consts, x, lr))
  recon = jax.jit(lambda p, x: model.apply(p.variables(consts), x, train=False))
  rng = np.random.default_rng(0)
  t0 = time.time()
  for t in range(1, steps + 1):
    idx = rng.integers(0, len(tr), batch)
    rate = lr * min(1.0, t / warmup) if warmup else lr
    part, loss = step(part, jnp.asarray(tr[idx]), jnp.float32(rate))
    if t % eval_every == 0:
      db = float(metrics.nmse_db(te, recon(part, jnp.asarray(te))))
      print(name, t, round(db, 2), f"{float(loss):.2e}", round(time.time() - t0), flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variants", required=True)
  p.add_argument("--eval-every", type=int, default=100)
  args = p.parse_args()
  x, _ = generate(8, 320, 0, workers=2, progress=False)
  tr, te = x[:, :-64].reshape(-1, 32, 32, 2), x[:, -64:].reshape(-1, 32, 32, 2)
  print("load", os.getloadavg(), flush=True)
  for spec in args.variants.split(","):
    name, lr, steps, warmup, head, m1, m2, *eps = spec.split(":")
    run(name, float(lr), int(steps), int(warmup), float(head), float(m1), float(m2), tr, te,
        args.eval_every, *map(float, eps))


if __name__ == "__main__":
  main()
