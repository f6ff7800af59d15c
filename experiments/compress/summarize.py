"""One table from every run under experiments/compress/results/ (their report.json).

    .venv/bin/python -m experiments.compress.summarize

prints the markdown table and writes it to ``results/summary.md``: per run, the
budget (fine-tuning epochs), the compression ratios against the 32-bit unpruned
network, the validation accuracy after each stage and the drop from the baseline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def describe(config: dict) -> str:
  """The method of a run in words, from its config."""
  if config.get("allocation") == "uniform":
    return f"uniform pruning, uniform {config['uniform_bits']}-bit"
  genes = "learned (a, b)" if config["evolution"] else "a = 1, b = 0"
  name = {"rank": "PIC (rank FP)", "l1": "L1 norm", "l2": "L2 norm",
          "bn_gamma": "BN |gamma|"}[config["criterion"]]
  return f"{name}, {genes}" if config["criterion"] == "rank" or config["evolution"] else name


def row(name: str, report: dict) -> str:
  config, cost = report["config"], report["cost"]
  base = report["baseline"]["val"]["accuracy"]
  final = report["final"]["val"]["accuracy"]
  return (f"| `{name}` | {describe(config)} | {config['ft_epochs']} + {config['qat_epochs']} | "
          f"{cost['flops_ratio']:.2f}x | {cost['bops_ratio']:.1f}x | "
          f"{report['pruned']['val']['accuracy']:.4f} | "
          f"{report['finetuned']['val']['accuracy']:.4f} | {final:.4f} | "
          f"{100 * (base - final):.2f} |")


def summarize(results: Path = RESULTS) -> str:
  lines = ["| run | method | epochs (FP + QAT) | FLOPs | BOPs | pruned | fine-tuned | final "
           "| drop (points) |", "|---|---|---|---|---|---|---|---|---|"]
  for path in sorted(results.glob("*/report.json")):
    lines.append(row(path.parent.name, json.loads(path.read_text())))
  return "\n".join(lines) + "\n"


def main() -> int:
  table = summarize()
  (RESULTS / "summary.md").write_text(table)
  print(table, end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
