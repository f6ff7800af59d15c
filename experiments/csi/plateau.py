"""Why did the first grid sit at ~0 dB? Centralized CsiNet on the grid's data, several settings.

Trains the whole autoencoder with the function every method's step runs
(:func:`picpq_jax.csi.methods.autoencoder_step`, Adam), on the same cached quadriga
data as ``run_grid.py`` (8 UEs x 320 samples, the last 64 of each UE held out), and
records test NMSE (eval-mode BN) every ``--eval-every`` steps and the step time.
Also writes two references computed in numpy: the NMSE of predicting 0.5 (the mean:
0 dB) and of the best linear code of the same size (PCA of the training set), the
bound a linear encoder/decoder could reach. Usage::

  PYTHONPATH=. python experiments/csi/plateau.py \
      --runs csinet:4:3e-3:16:1000:drawn,csinet:4:3e-3:16:1000:quiet

A run is ``arch:cr:lr:batch:steps:start`` (``start``: ``drawn``, the default draw, or
``quiet``, the decoder's quiet start, :func:`picpq_jax.csi.models.init_csi_variables`);
results append to ``--out`` under that key. The settings chosen here (the quiet
starts) are used by ``run_grid.py`` on data of another seed, so its test set was not
seen here.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax.csi import metrics
from picpq_jax.csi.methods import autoencoder_step, constants
from picpq_jax.csi.models import codeword_size, get_csi_model, init_csi_variables
from picpq_jax.csi.quadriga import generate
from picpq_jax.csi.run import ADAM
from picpq_jax.federated.steps import PartState

HERE = os.path.dirname(os.path.abspath(__file__))


def pca_nmse_db(train: np.ndarray, test: np.ndarray, k: int) -> float:
  """Test NMSE (dB) of the best rank-``k`` linear code fitted on ``train`` (centred at 0.5)."""
  a, b = train.reshape(len(train), -1) - 0.5, test.reshape(len(test), -1) - 0.5
  v = np.linalg.svd(a, full_matrices=False)[2][:k]
  rec = b @ v.T @ v
  return float(10 * np.log10(np.mean(np.sum((b - rec) ** 2, 1) / np.sum(b ** 2, 1))))


def train(arch, cr, lr, batch, steps, start, train_x, test_x, eval_every, seed=0):
  """Returns the NMSE curve ``[(step, dB, loss)]`` and the median step time (s)."""
  model = get_csi_model(arch, cr)
  variables = init_csi_variables(model, jax.random.key(seed), quiet=start == "quiet")
  consts = constants(variables)["model"]
  part = PartState.create(variables, ADAM)
  step = jax.jit(lambda p, x, lr: autoencoder_step(model, ADAM, p, consts, x, lr))
  recon = jax.jit(lambda p, x: model.apply(p.variables(consts), x, train=False))
  rng = np.random.default_rng(seed)
  n, curve, times = len(train_x), [], []
  order = rng.permutation(n)
  pos = 0
  for t in range(1, steps + 1):
    if pos + batch > n:
      order, pos = rng.permutation(n), 0
    x = jnp.asarray(train_x[order[pos:pos + batch]])
    pos += batch
    t0 = time.perf_counter()
    part, loss = step(part, x, jnp.float32(lr))
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
    if t % eval_every == 0 or t == steps:
      x_hat = recon(part, jnp.asarray(test_x))
      db = float(metrics.nmse_db(test_x, x_hat))
      curve.append((t, db, float(loss)))
      print(f"{arch} cr{cr} lr{lr} b{batch} {start} step {t}: test NMSE {db:.2f} dB, loss {float(loss):.2e}",
            flush=True)
  return curve, float(np.median(times[1:]))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--runs", default="csinet:4:3e-3:16:1000:drawn,csinet:4:3e-3:16:1000:quiet")
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--out", default=os.path.join(HERE, "results", "plateau.json"))
  args = p.parse_args()
  x, _ = generate(8, 320, 0, workers=2, progress=False)
  train_x, test_x = x[:, :-64].reshape(-1, 32, 32, 2), x[:, -64:].reshape(-1, 32, 32, 2)
  out = json.load(open(args.out)) if os.path.exists(args.out) else {}
  out["references"] = {
      "data": "quadriga indoor, 8 UEs x 320 samples (seed 0), last 64 per UE held out",
      "zero_prediction_db": float(metrics.nmse_db(test_x, np.full_like(test_x, 0.5))),
      "pca_db": {cr: pca_nmse_db(train_x, test_x, codeword_size(cr)) for cr in (4, 16)}}
  for run in args.runs.split(","):
    arch, cr, lr, batch, steps, start = run.split(":")
    t0 = time.time()
    if start not in ("drawn", "quiet"):
      raise SystemExit(f"{run}: the last field is 'drawn' or 'quiet'")
    curve, step_s = train(arch, int(cr), float(lr), int(batch), int(steps), start,
                          train_x, test_x, args.eval_every)
    out[run] = {"curve": curve, "step_s": step_s, "wall_s": time.time() - t0,
                "load": os.getloadavg()}
    json.dump(out, open(args.out, "w"), indent=1)


if __name__ == "__main__":
  main()
