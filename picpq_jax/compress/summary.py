"""The before/after table ``picpq compress`` prints at the end of a run."""

from __future__ import annotations

import itertools


def run_length(values: list[int]) -> str:
  """``[32, 8, 8, 8, 6]`` -> ``"32,8x3,6"`` (the ``--max-bits`` notation)."""
  parts = []
  for value, group in itertools.groupby(values):
    n = len(list(group))
    parts.append(f"{value}x{n}" if n > 1 else f"{value}")
  return ",".join(parts)


def before_after_table(results: dict) -> str:
  """A markdown table of the pretrained and the compressed model from a report record.

  Args:
    results: what ``run_compress`` returns: ``baseline``/``final`` accuracies,
      ``cost`` (``flops``, ``bops`` and their ``*_full``), ``layers`` (``w_bits`` per
      conv/dense layer) and ``deployed`` (``file_bytes``, ``baseline_float32_bytes``).

  Returns:
    Rows: validation accuracy, FLOPs (MACs), BOPs (with the ratio), bytes on disk and
    weight bits per layer, each before and after.
  """
  c, d = results["cost"], results["deployed"]
  before_acc = results["baseline"]["val"]["accuracy"]
  after_acc = results["final"]["val"]["accuracy"]
  bits = [r["w_bits"] for r in results["layers"]]
  rows = [
      ("validation accuracy", f"{before_acc:.4f}", f"{after_acc:.4f}",
       f"{100 * (after_acc - before_acc):+.2f} points"),
      ("FLOPs (MACs / image)", f"{c['flops_full']:,.0f}", f"{c['flops']:,.0f}",
       f"{c['flops_ratio']:.2f}x fewer"),
      ("BOPs / image", f"{c['bops_full']:,.0f}", f"{c['bops']:,.0f}",
       f"{c['bops_ratio']:.2f}x fewer"),
      ("bytes on disk (float32 / packed)", f"{d['baseline_float32_bytes']:,}",
       f"{d['file_bytes']:,}", f"{d['baseline_float32_bytes'] / d['file_bytes']:.1f}x smaller"),
      ("weight bits per layer", run_length([32] * len(bits)), run_length(bits), ""),
  ]
  lines = ["| | before | after | change |", "|---|---|---|---|"]
  lines += [f"| {name} | {b} | {a} | {ch} |" for name, b, a, ch in rows]
  return "\n".join(lines)
