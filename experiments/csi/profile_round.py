"""Where a round of the CSI grid spends its wall time, per method.

Builds each method's programs exactly as ``run_csi`` does (the grid's setting:
quadriga seed 1, 8 UEs, 5 local steps, batch 16, two simulated devices) and times,
round-robin over the methods after a warm-up round: the round program (``block_until_ready``),
the host work before it (batch gather + ``device_put``), the evaluation, and the
engine's checkpoint save; it counts compilations (``jax.log_compiles`` messages).
Usage::

  XLA_FLAGS=--xla_force_host_platform_device_count=2 PYTHONPATH=. \
      python experiments/csi/profile_round.py --config crnet:4 [--rounds 3] [--out profile_round-crnet-cr4]
"""

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from picpq_jax.csi import get_csi_model, init_csi_variables, methods
from picpq_jax.csi.config import CsiConfig
from picpq_jax.csi.domain import frequency_response
from picpq_jax.csi.run import ADAM, evaluate, load_csi
from picpq_jax.engine.checkpoints import Checkpoints
from picpq_jax.federated.distributed import AXIS
from picpq_jax.federated.partition import client_batch_indices

HERE = os.path.dirname(os.path.abspath(__file__))


class _Count(logging.Handler):
  def __init__(self):
    super().__init__()
    self.n = 0

  def emit(self, record):
    self.n += "Compiling" in record.getMessage() or "Finished XLA compilation" in record.getMessage()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="crnet:4")
  parser.add_argument("--methods", default="centralized,fedavg,split")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  arch, cr = args.config.split(":")
  from experiments.csi.run_grid import COMMON
  c = CsiConfig(arch=arch, cr=int(cr), rounds=args.rounds, **COMMON)
  model = get_csi_model(arch, int(cr))
  train, test, _ = load_csi(c)
  variables = init_csi_variables(model, jax.random.key(c.seed))
  hf = frequency_response(test.reshape(-1, *test.shape[2:]))
  n = train.shape[1]
  counter = _Count()
  logging.getLogger("jax").addHandler(counter)
  jax.config.update("jax_log_compiles", True)
  setup = {}
  for m in args.methods.split(","):
    # "centralized@replicated": the step on as many 'clients' devices as divide the UEs
    # (each computes the same whole-batch step; what the grid ran before method_mesh)
    mesh = (methods.csi_mesh(c.ues) if m == "centralized@replicated"
            else methods.method_mesh(m, c.ues, c.stages))
    m_run = m.split("@")[0]
    consts = jax.device_put(methods.constants(variables), NamedSharding(mesh, P()))
    state = jax.device_put(methods.init_state(m_run, variables, ADAM, c.ues), NamedSharding(mesh, P()))
    setup[m] = dict(method=m_run, mesh=mesh, consts=consts, state=state,
                    run=methods.round_program(m_run, model, ADAM, mesh, c.encoder_sync),
                    rec=methods.reconstruct_program(model), times={k: [] for k in
                    ("host", "round", "eval", "checkpoint")}, compiles_after_warmup=0)
  weights = jnp.full(c.ues, float(n))
  lrs = jnp.full(c.local_steps, c.lr, jnp.float32)
  bits, tbits = jnp.int32(c.bits), jnp.int32(c.target_bits)
  tmp = tempfile.mkdtemp()
  for r in range(args.rounds + 1):  # round 0: warm-up (compilation)
    for m, s in setup.items():
      before = counter.n
      t0 = time.perf_counter()
      rows = np.stack([client_batch_indices(np.arange(n), c.seed, u, r, c.local_steps,
                                            c.batch_size) for u in range(c.ues)])
      x = jax.device_put(train[np.arange(c.ues)[:, None, None], rows],
                         NamedSharding(s["mesh"], P(AXIS)))
      x.block_until_ready()
      t1 = time.perf_counter()
      s["state"], loss = s["run"](s["state"], s["consts"], x, weights, lrs, bits, tbits)
      float(loss)
      t2 = time.perf_counter()
      evaluate(s["rec"], s["method"], s["state"], s["consts"], test, hf)
      t3 = time.perf_counter()
      Checkpoints(os.path.join(tmp, m, str(r))).save(r + 1, s["state"], {"step": r + 1})
      t4 = time.perf_counter()
      if r:
        for k, v in zip(("host", "round", "eval", "checkpoint"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
          s["times"][k].append(v)
        s["compiles_after_warmup"] += counter.n - before
      print(m, r, f"host {t1 - t0:.3f} round {t2 - t1:.3f} eval {t3 - t2:.3f} "
            f"checkpoint {t4 - t3:.3f} s; load {os.getloadavg()[0]:.1f}", flush=True)
  shutil.rmtree(tmp)
  out = {"config": args.config, "load": os.getloadavg(), "devices": jax.device_count(),
         "per_method": {m: {"median_s": {k: statistics.median(v) for k, v in s["times"].items()},
                            "compiles_after_warmup": s["compiles_after_warmup"]}
                        for m, s in setup.items()}}
  print(json.dumps(out, indent=1))
  if args.out:
    with open(os.path.join(HERE, "results", args.out + ".json"), "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
