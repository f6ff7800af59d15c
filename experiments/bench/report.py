"""Markdown tables of saved benchmark results: ``python -m experiments.bench.report
[folder ...]`` (default ``experiments/bench/results``) prints, for every JSON in each
folder, its table and a line with the date, command and load average. RESULTS.md
quotes this output, so its numbers are never typed by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from experiments.bench import common

ORDER = ("compile_time", "compile_time_options", "step_time", "step_time_resnet20_vgg16",
         "step_time_bf16", "step_time_bf16_resnet20_vgg16", "step_time_options",
         "step_time_options_r20_r56", "step_profile", "conv_parts",
         "tiny_conv", "hrank", "evolution", "evolution_tau200", "evolution_tau200_quiet", "stages", "stages_map_quiet", "stages_unroll_quiet", "compacted", "compacted_tuned", "compacted_chunks", "conv_widths", "grad_accuracy")


def render(path: Path) -> str:
  """The table and run note of one result file."""
  from experiments.bench import (compacted, compile_time, conv_parts, conv_widths, evolution,
                                 grad_accuracy, hrank, pipeline_stages, step_profile, step_time,
                                 tiny_conv)
  tables = {"compile_time": compile_time.table, "step_time": step_time.table,
            "hrank": hrank.table, "evolution": evolution.table, "compacted": compacted.table,
            "tiny_conv": tiny_conv.table, "conv_parts": conv_parts.table,
            "step_profile": step_profile.table, "grad_accuracy": grad_accuracy.table,
            "conv_widths": conv_widths.table, "stages": pipeline_stages.table}
  res = json.loads(path.read_text())
  return tables[res["workload"]](res) + "\n" + common.run_note(res)


def main(argv: list[str] | None = None) -> None:
  folders = [Path(a) for a in (sys.argv[1:] if argv is None else argv)] or [
      Path("experiments/bench/results")]
  for folder in folders:
    files = sorted(folder.glob("*.json"),
                   key=lambda p: ORDER.index(p.stem) if p.stem in ORDER else len(ORDER))
    for path in files:
      print(render(path))


if __name__ == "__main__":
  main()
