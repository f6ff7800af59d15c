"""One 3x3 convolution at the widths a pruned network keeps, three ways:
``python -m experiments.bench.conv_widths``.

Times (forward, jitted with the library's XLA options, median of ``--reps``)
XLA's convolution, the input-tap matmul and the output-tap matmul
(:mod:`picpq_jax.models.conv_algorithms`) on random data, for the stage widths of
a CIFAR ResNet pruned to few channels, and saves ``<out-dir>/conv_widths.json``.
It shows what the per-shape tuning exploits: XLA's time barely follows the output
width, and each alternative wins only at its end of the shape range.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.bench import common, setups
from picpq_jax.models import conv_algorithms

# (maps H = W, C_in, C_out): stage 1 at 32x32, stage 2 at 16x16, stage 3 at 8x8
SHAPES = ((32, 16, 16), (32, 16, 8), (32, 16, 7), (32, 16, 4), (32, 16, 2), (32, 2, 16),
          (32, 7, 16), (32, 8, 16), (16, 32, 32), (16, 32, 10), (16, 10, 32), (8, 64, 64),
          (8, 64, 29), (8, 29, 64))
PADS = ((1, 1), (1, 1))


def run(batch: int, reps: int) -> dict:
  """Median seconds of each algorithm for every shape of :data:`SHAPES`."""
  load_start = common.loadavg()
  rows = []
  for hw, c_in, c_out in SHAPES:
    key = conv_algorithms.shape_key((batch, hw, hw, c_in), (3, 3, c_in, c_out), PADS,
                                    "float32")
    seconds = conv_algorithms.time_algorithms(key, reps, setups.compiler_options(None))
    rows.append({"maps": hw, "c_in": c_in, "c_out": c_out, "seconds": seconds})
    print(f"{hw}x{hw} {c_in:3d} -> {c_out:3d}: "
          + ", ".join(f"{n} {s * 1e3:.2f} ms" for n, s in seconds.items()), flush=True)
  return common.result("conv_widths", {"batch": batch, "reps": reps}, rows, load_start)


def table(res: dict) -> str:
  """Markdown table: ms per algorithm and shape, the fastest in bold."""
  lines = []
  for r in res["rows"]:
    best = min(r["seconds"], key=r["seconds"].get)
    cells = [f"**{s * 1e3:.2f}**" if n == best else f"{s * 1e3:.2f}"
             for n, s in r["seconds"].items()]
    lines.append([f"{r['maps']}x{r['maps']}", f"{r['c_in']} -> {r['c_out']}", *cells])
  cfg = res["config"]
  return common.markdown_table(
      f"One 3x3 conv, batch {cfg['batch']}, forward ms (median of {cfg['reps']})",
      ["maps", "channels", *conv_algorithms.ALGORITHMS], lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--out-dir", default="experiments/bench/results")
  args = parser.parse_args(argv)
  res = run(args.batch, args.reps)
  res["environment"]["command"] = " ".join(
      ["python", "-m", "experiments.bench.conv_widths", *(sys.argv[1:] if argv is None else argv)])
  common.save(res, Path(args.out_dir), "conv_widths")
  print(table(res))
  print(common.run_note(res))


if __name__ == "__main__":
  main()
