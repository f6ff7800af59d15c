"""Exploratory variants behind the output-init choice (kept as run; log in
results/plateau_variants.log). Centralized CR 4 on plateau.py's seed-0 data, test NMSE
every 100 steps. V=a: CsiNet out conv x0.01 at lr 3e-3 / 1e-3; b: the same, 1500 steps;
d: CRNet with its head's and both CRBlocks' last BN scales x0.01, and CRNet as drawn;
e: Adam eps 1e-15; f: CRNet scales x0.1. Usage: V=a PYTHONPATH=. python experiments/csi/plateau_variants.py
"""
import time, os
import jax, jax.numpy as jnp, numpy as np
import experiments.csi.plateau as P
from picpq_jax.csi import metrics
from picpq_jax.csi.methods import autoencoder_step, constants
from picpq_jax.csi.models import get_csi_model, init_csi_variables
from picpq_jax.csi.run import ADAM
from picpq_jax.federated.steps import PartState
x,_=P.generate(8,320,0,workers=2,progress=False)
tr, te = x[:, :-64].reshape(-1, 32, 32, 2), x[:, -64:].reshape(-1, 32, 32, 2)
def run(name, arch, lr, batch, steps, modify):
  model = get_csi_model(arch, 4)
  v = init_csi_variables(model, jax.random.key(0), quiet=False)  # as drawn, then modify
  v = modify(v)
  consts = constants(v)["model"]
  part = PartState.create(v, ADAM)
  step = jax.jit(lambda p, x, lr: autoencoder_step(model, ADAM, p, consts, x, lr))
  recon = jax.jit(lambda p, x: model.apply(p.variables(consts), x, train=False))
  rng = np.random.default_rng(0); t0=time.time()
  for t in range(1, steps+1):
    idx = rng.integers(0, len(tr), batch)
    part, loss = step(part, jnp.asarray(tr[idx]), jnp.float32(lr))
    if t % 100 == 0:
      print(name, t, round(float(metrics.nmse_db(te, recon(part, jnp.asarray(te)))),2), f"{float(loss):.2e}", round(time.time()-t0), flush=True)
def scale_out(s):
  def f(v):
    v = jax.tree.map(lambda a: a, v)
    p = v["params"]["decoder"]["out"]
    p["kernel"] = p["kernel"] * s
    return v
  return f
which = os.environ.get("V","a")
if which == "a":
  run("csinet out*0.01 lr3e-3", "csinet", 3e-3, 16, 300, scale_out(0.01))
  run("csinet out*0.01 lr1e-3", "csinet", 1e-3, 16, 300, scale_out(0.01))
if which == "b":
  run("csinet out*0.01 lr3e-3", "csinet", 3e-3, 16, 1500, scale_out(0.01))
if which == "c":
  run("csinet out*0 lr3e-3", "csinet", 3e-3, 16, 400, scale_out(0.0))
  run("csinet out*0.01 lr3e-3 b64", "csinet", 3e-3, 64, 400, scale_out(0.01))
def crnet_quiet(s):
  def f(v):
    v = jax.tree.map(lambda a: a, v)
    d = v["params"]["decoder"]
    d["head"]["bn"]["scale"] = d["head"]["bn"]["scale"] * s
    for b in ("crblock1", "crblock2"):
      d[b]["merge_conv1x1"]["bn"]["scale"] = d[b]["merge_conv1x1"]["bn"]["scale"] * s
    return v
  return f
if which == "d":
  run("crnet quiet lr3e-3", "crnet", 3e-3, 16, 400, crnet_quiet(0.01))
  run("crnet default lr3e-3", "crnet", 3e-3, 16, 400, lambda v: v)
if which == "e":
  import optax
  ADAM = optax.adam(1.0, eps=1e-15)
  run("crnet quiet eps lr3e-3", "crnet", 3e-3, 16, 300, crnet_quiet(0.01))
  run("csinet out*0.01 eps lr3e-3", "csinet", 3e-3, 16, 500, scale_out(0.01))
if which == "f":
  run("crnet quiet0.1 lr3e-3", "crnet", 3e-3, 16, 300, crnet_quiet(0.1))
