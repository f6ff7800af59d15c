"""Reconstruction error of the quantized frozen base on all-MiniLM-L6-v2's weights.

Every Dense kernel that ``picpq finetune --method qlora`` quantizes (the pattern
``kernel$``: 36 kernels, query/key/value/output and the two MLP kernels of the 6
blocks; their count is in the output) is quantized block-wise
with absmax (64 input rows per scale) on the uniform 4-bit grid, on QLoRA's NF4
levels, and on NF4 with double-quantized scales, then dequantized. Reported over
all those kernels together:

* relative error ``||W - Q(W)||_F / ||W||_F`` (every kernel's squares summed),
* mean absolute error ``mean |W - Q(W)|``,
* bytes per weight of the stored form (codes and scales, :func:`picpq_jax.federated.
  comm.tree_bytes`).

Command (from the repo root; about a minute on CPU):

    .venv/bin/python -m experiments.finetune.nf4_error

writes ``results/nf4_error.json`` and ``results/nf4_error.md``.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from picpq_jax.federated.comm import tree_bytes
from picpq_jax.finetune import qlora
from picpq_jax.finetune.peft import flatten
from picpq_jax.finetune.pretrained import load_minilm

RESULTS = Path(__file__).resolve().parent / "results"
GRIDS = {  # name -> quantize() options
    "int8 (uniform)": dict(bits=8, grid="int"),
    "int4 (uniform)": dict(bits=4, grid="int"),
    "nf4": dict(bits=4, grid="nf4"),
    "nf4 + double quant": dict(bits=4, grid="nf4", double_quant=True),
    "int4 + double quant": dict(bits=4, grid="int", double_quant=True),
}


def errors(kernels: dict[str, np.ndarray], block: int, **options) -> dict[str, float]:
  """Relative Frobenius error, mean absolute error and bytes per weight of one grid
  over all ``kernels`` together."""
  sq_err = sq = abs_err = stored = count = 0.0
  for w in kernels.values():
    q = qlora.quantize(jnp.asarray(w), block_size=block, **options)
    d = np.asarray(qlora.dequantize(q), np.float64) - w
    sq_err, sq = sq_err + np.sum(d * d), sq + np.sum(np.square(w, dtype=np.float64))
    abs_err, stored, count = abs_err + np.abs(d).sum(), stored + tree_bytes(q), count + w.size
  return {"relative_error": float(np.sqrt(sq_err / sq)), "mean_abs_error": abs_err / count,
          "bytes_per_weight": stored / count}


def main() -> None:
  block = 64
  params = load_minilm().params
  kernels = {p: np.asarray(v, np.float32) for p, v in flatten(params).items()
             if p.endswith("kernel") and np.ndim(v) == 2}
  weights = sum(w.size for w in kernels.values())
  rows = {name: errors(kernels, block, **opts) for name, opts in GRIDS.items()}
  command = "python -m experiments.finetune.nf4_error " + " ".join(sys.argv[1:])
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "nf4_error.json").write_text(json.dumps(
      {"command": command, "kernels": len(kernels), "weights": weights, "block_size": block,
       "machine": platform.machine(), "rows": rows}, indent=1))
  lines = ["| grid | relative error (Frobenius) | mean abs error | bytes / weight |",
           "|---|---|---|---|"]
  lines += [f"| {n} | {r['relative_error']:.4f} | {r['mean_abs_error']:.3e} | "
            f"{r['bytes_per_weight']:.4f} |" for n, r in rows.items()]
  text = (f"# Quantization error on all-MiniLM-L6-v2's Dense kernels\n\nCommand: "
          f"`{command.strip()}`\n\n{len(kernels)} kernels, {weights:,} weights, absmax blocks "
          f"of {block} input rows per output column.\n\n" + "\n".join(lines) + "\n")
  (RESULTS / "nf4_error.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
