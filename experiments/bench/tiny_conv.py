"""A/B of the tiny-map convolution path: ``python -m experiments.bench.tiny_conv``.

:func:`picpq_jax.models.layers.conv2d` runs a stride-1 dense conv whose output has
at most ``TINY_MAP_PIXELS`` pixels as one matmul over shifted taps, because
XLA:CPU's convolution is pathologically slow there (VGG-16's last block on 32x32
inputs works on 2x2 maps). This script times a model's train step and inference
with that path on and off (``TINY_MAP_PIXELS = 0`` sends every conv to
``lax.conv_general_dilated``), alternating the two in one process so both see the
same machine load, and saves ``<out-dir>/tiny_conv.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import common
from picpq_jax import models
from picpq_jax.models import layers
from picpq_jax.train import optim, steps

VARIANTS = (("lax conv everywhere", 0), ("tiny maps as matmul", layers.TINY_MAP_PIXELS))


def _programs(model, variables, tx, x, y) -> dict:
  """Compiled (train step, state, inference) per variant, each traced with its setting."""
  default = layers.TINY_MAP_PIXELS
  out = {}
  try:
    for name, pixels in VARIANTS:
      layers.TINY_MAP_PIXELS = pixels
      step = steps.jit_train_step(model, tx, lambda k, images: images)
      state = steps.create_train_state(jax.tree.map(jnp.copy, variables), tx)
      state, _ = step(state, jax.random.key(0), x, y)
      infer = jax.jit(lambda v, images: model.apply(v, images, train=False))
      jax.block_until_ready((state, infer(variables, x)))
      out[name] = (step, state, infer)
  finally:
    layers.TINY_MAP_PIXELS = default
  return out


def run(arch: str, batch: int, reps: int) -> dict:
  load_start = common.loadavg()
  model = models.get_model(arch, num_classes=10)
  variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  tx = optim.sgd_nesterov(0.01, 0.9, 5e-4)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  programs = _programs(model, variables, tx, x, y)
  times = {(name, kind): [] for name in programs for kind in ("train", "infer")}
  for rep in range(reps):
    for name, (step, state, infer) in programs.items():
      start = time.perf_counter()
      state, _ = step(state, jax.random.key(rep), x, y)
      jax.block_until_ready(state)
      times[(name, "train")].append(time.perf_counter() - start)
      programs[name] = (step, state, infer)
      start = time.perf_counter()
      jax.block_until_ready(infer(variables, x))
      times[(name, "infer")].append(time.perf_counter() - start)
  rows = [{"model": arch, "batch": batch, "variant": name, "kind": kind, **common.summarize(t)}
          for (name, kind), t in times.items()]
  return common.result("tiny_conv", {"model": arch, "batch": batch, "reps": reps}, rows,
                       load_start)


def table(res: dict) -> str:
  """Markdown table: median times per variant and the speed-up of the matmul path."""
  by = {(r["variant"], r["kind"]): r["median_s"] for r in res["rows"]}
  lines = []
  for kind in ("train", "infer"):
    base = by[(VARIANTS[0][0], kind)]
    for name, _ in VARIANTS:
      lines.append([kind, name, common.fmt_s(by[(name, kind)]), f"{base / by[(name, kind)]:.1f}x"])
  cfg = res["config"]
  return common.markdown_table(
      f"{cfg['model']} at batch {cfg['batch']}, convs on tiny maps as lax convs or as one "
      f"matmul (median of {cfg['reps']}, alternated in one process)",
      ["kind", "variant", "median s", "speed-up"], lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="vgg16")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--out-dir", default="experiments/bench/results")
  args = parser.parse_args(argv)
  res = run(args.arch, args.batch, args.reps)
  res["environment"]["command"] = " ".join(
      ["python", "-m", "experiments.bench.tiny_conv", *(sys.argv[1:] if argv is None else argv)])
  common.save(res, Path(args.out_dir), "tiny_conv")
  print(table(res))
  print(common.run_note(res))


if __name__ == "__main__":
  main()
