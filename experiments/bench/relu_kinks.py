"""Why the library's gradient check uses a smooth network: ``python -m
experiments.bench.relu_kinks`` prints how far ResNet-8's float64 train-mode
gradient moves when its float64 inputs and parameters move by one float32 ulp
(each entry times ``1 + 6e-8 * N(0, 1)``), for a few draws and batch sizes.

No compiler option is involved: everything runs in float64 with XLA's defaults. A
move of 1e-2 means a ReLU pre-activation within rounding distance of zero flipped
sides, so any float32 program, however accurate its kernels, may land 1e-2 away from
the float64 gradient by luck; the same draw on a smooth network moves by about 1e-7.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax import compile_options, models
from picpq_jax.train.steps import cross_entropy


def gradient_moves(model, batch: int, draws: int) -> list[float]:
  """Worst relative change (over leaves, of ``max |dg| / max |g|``) of the float64
  gradient of ``model`` under ``draws`` float32-ulp perturbations of its inputs."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, 32, 32, 3))
  y = rng.integers(0, 10, batch)
  variables = jax.jit(lambda k, x: model.init(k, x, train=True))(
      jax.random.key(0), jnp.asarray(x[:1], jnp.float32))
  with jax.enable_x64(True):
    m64 = model.clone(dtype=jnp.float64)

    def loss(params, x):
      logits, _ = m64.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
      return jnp.mean(cross_entropy(logits, jnp.asarray(y)))

    grad = jax.jit(jax.grad(loss))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables["params"])
    base = jax.tree.leaves(grad(params, jnp.asarray(x)))
    moves = []
    for draw in range(1, draws + 1):
      r = np.random.default_rng(draw)
      ulp = lambda a: a * (1 + 6e-8 * r.normal(size=a.shape))
      moved = jax.tree.leaves(grad(jax.tree.map(ulp, params), jnp.asarray(ulp(x))))
      moves.append(max(float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
                       for a, b in zip(moved, base)))
  return moves


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="32,64")
  parser.add_argument("--draws", type=int, default=3)
  args = parser.parse_args(argv)
  nets = {"resnet8 (ReLU)": models.get_model("resnet8"),
          "smooth resnet8 (tanh)": compile_options.SmoothResNet8()}
  print(f"CPU vector extensions: {', '.join(compile_options.vector_extensions())}")
  for batch in (int(b) for b in args.batches.split(",")):
    for name, model in nets.items():
      moves = ", ".join(f"{m:.1e}" for m in gradient_moves(model, batch, args.draws))
      print(f"{name}, batch {batch}: float64 gradient moved by {moves}", flush=True)


if __name__ == "__main__":
  main()
