"""Is vmap's grouped convolution what makes the per-UE steps slow on XLA:CPU?

Times one Adam step of the whole autoencoder (``methods.autoencoder_step``) three ways
on one device: one model on 4 x 16 samples, 4 models under ``vmap`` (per-UE kernels:
one grouped conv), and 4 models under ``lax.map`` (a loop, ungrouped convs). Median of
5 after a warm-up, two passes. Usage::

  CFG=crnet:4 PYTHONPATH=. python experiments/csi/vmap_vs_map.py   # -> stdout
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from experiments.csi.run_grid import median_time
from picpq_jax.csi import get_csi_model, init_csi_variables, methods


def main(ues=4, batch=16):
  arch, cr = os.environ.get("CFG", "crnet:4").split(":")
  model = get_csi_model(arch, int(cr))
  v = init_csi_variables(model, jax.random.key(0))
  part = methods.PartState.create(v, methods.ADAM)
  parts = jax.tree.map(lambda a: jnp.broadcast_to(a, (ues, *a.shape)), part)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(ues, batch, 32, 32, 2)), jnp.float32)
  step = functools.partial(methods.autoencoder_step, model, methods.ADAM,
                           consts=methods.constants(v)["model"], lr=jnp.float32(1e-3))
  one = jax.jit(lambda p, x: step(p, x=x.reshape(-1, 32, 32, 2)))
  vmapped = jax.jit(lambda ps, x: jax.vmap(lambda p, xu: step(p, x=xu))(ps, x))
  mapped = jax.jit(lambda ps, x: lax.map(lambda a: step(a[0], x=a[1]), (ps, x)))
  for _ in range(2):
    print(f"one model batch {ues * batch}:", median_time(one, part, x, repeat=5),
          f"vmap {ues}x{batch}:", median_time(vmapped, parts, x, repeat=5),
          f"lax.map {ues}x{batch}:", median_time(mapped, parts, x, repeat=5),
          "load", os.getloadavg()[0], flush=True)


if __name__ == "__main__":
  main()
