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
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments.bench import common, setups
from experiments.bench.step_time import measure_round_robin
from picpq_jax.models import layers

VARIANTS = (("lax conv everywhere", 0), ("tiny maps as matmul", layers.TINY_MAP_PIXELS))


def _timed_fns(arch: str, batch: int) -> dict:
  """``{(variant, kind): fn}``, each compiled (first call) with its ``TINY_MAP_PIXELS``."""
  model, variables, _ = setups.jax_model(arch)
  images, labels = setups.random_batch(batch)
  x = jnp.asarray(images)
  default, fns = layers.TINY_MAP_PIXELS, {}
  try:
    for name, pixels in VARIANTS:
      layers.TINY_MAP_PIXELS = pixels  # read while tracing
      train = setups.JaxStepper(*setups.jax_train(model, variables), images, labels)
      infer = setups.jax_infer(model)
      fns[(name, "train")] = train
      fns[(name, "infer")] = lambda infer=infer: jax.block_until_ready(infer(variables, x))
      fns[(name, "train")]()
      fns[(name, "infer")]()
  finally:
    layers.TINY_MAP_PIXELS = default
  return fns


def run(arch: str, batch: int, reps: int) -> dict:
  """Train-step and inference times of ``arch`` with the tiny-map path off and on."""
  load_start = common.loadavg()
  stats = measure_round_robin(_timed_fns(arch, batch), warmup=0, reps=reps)
  rows = [{"model": arch, "batch": batch, "variant": name, "kind": kind, **s}
          for (name, kind), s in stats.items()]
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
