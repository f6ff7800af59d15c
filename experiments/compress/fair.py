"""A fair CPU-scale comparison of filter properties, with and without learned (a, b).

Every row starts from the committed ResNet-20 baseline and gets the same treatment:
the same budget, the same (tiny) search, the same fine-tuning, the reference
numerics (DoReFa, activations quantized at each block's inner map) unless the row
says otherwise. The data (:mod:`experiments.compress.fair_data`) is 8,000 of the
baseline's training images, from which the pipeline carves its validation (5,000)
and search (600) splits, and a ``test/`` split: the 5,000 images the baseline held
out. Candidates are scored on the search split; nothing is chosen on validation or
test; the test accuracy is the reported number.

    .venv/bin/python -m experiments.compress.fair --rows t45-rank-conv-unit,...
    .venv/bin/python -m experiments.compress.fair --summarize

Each finished row writes ``results/fair/<row>.json`` (its numbers, command, wall
time and load); ``--summarize`` writes ``results/fair/fair.md`` (mean and spread
over seeds) and ``results/fair/accuracy_vs_bops.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from experiments.compress import fair_data
from picpq_jax.compress import CompressConfig, run_compress
from picpq_jax.compress.report import plot_accuracy_vs_bops

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ROOT / "experiments" / "baselines" / "checkpoints" / "resnet20"
DATA = ROOT / "runs" / "compress" / "fair-data.zip"  # made by experiments.compress.fair_data
OUT = Path(__file__).resolve().parent / "results" / "fair"

# Equal treatment for every row (sized for a shared 2-core CPU).
COMMON = dict(population=8, sample=4, generations=4, children=1, tau_hat=5,
              search_val_size=400, val_size=500, ft_epochs=1, qat_epochs=2,
              strategy="unroll", fp_batches=6, fp_batch_size=128)
METHODS = {  # name -> (label, options)
    "rank-conv": ("rank @ conv (reference FP)", dict(criterion="rank", fp_point="conv")),
    "rank-relu": ("rank @ post-ReLU (HRank)", dict(criterion="rank", fp_point="relu")),
    "l1": ("L1 norm", dict(criterion="l1")),
}
TARGETS = {"t45": 0.45, "t65": 0.65}  # fraction of FLOPs kept: the paper's 55% removed, milder
CRITERIA_ROWS = [f"{m}-{g}" for m in METHODS for g in ("unit", "evo")] + ["uniform"]
HEADLINE_SEEDS = (1, 2)
# The search as this project first wrote it, each choice the reference's opposite.
EARLIER_SEARCH = dict(identity_seed=False, sampling="distinct", returns="final",
                      search_optimizer="nesterov")


def grid() -> Iterator[str]:
  """Every row, in the order it runs: both budgets and every criterion (the milder
  budget's rows in the order of their 45% test accuracy); the other
  activation placement (every conv's input) for the two best methods at 45% (by
  seed-0 test accuracy, known once those rows ran); seeds 1 and 2 of the headline
  rows: the reference's rank @ conv and the best other criterion, both gene kinds;
  then that criterion with our earlier search choices, 3 seeds."""
  yield from (f"t45-{r}" for r in CRITERIA_ROWS)
  by_t45 = sorted(CRITERIA_ROWS, key=lambda r: -_record(f"t45-{r}")["final_test_accuracy"])
  yield from (f"t65-{r}" for r in by_t45)  # where time runs out, the best ran first
  best = [r for r in by_t45 if r != "uniform"]
  yield from (f"t45-{r}-every" for r in best[:2])
  other = next(r.rsplit("-", 1)[0] for r in best if not r.startswith("rank-conv"))
  for seed in HEADLINE_SEEDS:
    yield from (f"t45-{m}-{g}-s{seed}" for m in (other, "rank-conv") for g in ("unit", "evo"))
  for seed in (0, *HEADLINE_SEEDS):  # the earlier search against the reference's
    yield f"t45-{other}-ours" + (f"-s{seed}" if seed else "")


def _record(row: str) -> dict:
  return json.loads((OUT / f"{row}.json").read_text())


def row_options(row: str) -> tuple[str, dict]:
  """``t45-rank-conv-evo[-every][-s1]`` -> (label, CompressConfig options); genes:
  ``unit`` (a=1, b=0), ``evo`` (the reference's search) or ``ours`` (our earlier one)."""
  parts = row.split("-")
  target = TARGETS[parts[0]]
  seed = int(parts[-1][1:]) if parts[-1].startswith("s") and parts[-1][1:].isdigit() else 0
  rest = "-".join(p for p in parts[1:] if not (p.startswith("s") and p[1:].isdigit()))
  act = "every-conv" if rest.endswith("-every") else "inner"
  rest = rest.removesuffix("-every")
  if rest == "uniform":
    label, opts = "uniform pruning, 4-bit", dict(allocation="uniform", uniform_bits=4,
                                                  evolution=False, criterion="l1")
  else:
    method, genes = rest.rsplit("-", 1)
    label, opts = METHODS[method]
    label += ", a=1 b=0" if genes == "unit" else ", learned (a, b)"
    opts = {**opts, "evolution": genes != "unit"}
    if genes == "ours":
      label += ", our earlier search"
      opts.update(EARLIER_SEARCH)
  if act != "inner":
    label += ", every-conv act. quant."
  return label, {**COMMON, **opts, "target": target, "seed": seed, "act_quant": act}


def _treatment(row: str) -> dict:
  """Everything a row's result depends on: its options and the data's sizes."""
  return {**row_options(row)[1], "train_images": fair_data.TRAIN_IMAGES,
          "test_images": fair_data.TEST_IMAGES}


def run_row(row: str) -> dict:
  """Runs (or resumes) one row; writes and returns its record."""
  label, opts = row_options(row)
  if (OUT / f"{row}.json").exists() and _record(row).get("treatment") == _treatment(row):
    return _record(row)
  config = CompressConfig(checkpoint=str(BASELINE), data=str(DATA),
                          workdir=f"runs/compress/fair/{row}", resume=True, progress=False,
                          **opts)
  start, load = time.time(), os.getloadavg()
  report = run_compress(config, print_fn=lambda s: None)
  record = {
      "row": row, "label": label, "target": opts["target"], "seed": opts["seed"],
      "treatment": _treatment(row),
      "command": f".venv/bin/python -m experiments.compress.fair --rows {row}",
      "wall_s": round(time.time() - start, 1), "load_at_start": load[0],
      "load_at_end": os.getloadavg()[0],
      "baseline_val_accuracy": report["baseline"]["val"]["accuracy"],
      "pruned_val_accuracy": report["pruned"]["val"]["accuracy"],
      "baseline_test_accuracy": report["baseline"]["test"]["accuracy"],
      "pruned_test_accuracy": report["pruned"]["test"]["accuracy"],
      "final_val_accuracy": report["final"]["val"]["accuracy"],
      "final_test_accuracy": report["final"]["test"]["accuracy"],
      "final_test_loss": report["final"]["test"]["loss"],
      "flops_ratio": report["cost"]["flops_ratio"], "bops": report["cost"]["bops"],
      "bops_full": report["cost"]["bops_full"], "bops_ratio": report["cost"]["bops_ratio"],
      "search_best_loss": (min(report["best_ever_history"])
                           if report.get("best_ever_history") else None),
      "deviations": report["deviations"]}
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / f"{row}.json").write_text(json.dumps(record, indent=2))
  return record


def _order(row: str) -> tuple:
  """Table order: budget, then criterion and gene kind as in :func:`grid`."""
  target, _, rest = re.sub(r"-s\d+$", "", row).partition("-")
  method = rest.removesuffix("-every")
  kinds = [*CRITERIA_ROWS, *(f"{m}-ours" for m in METHODS)]
  return list(TARGETS).index(target), kinds.index(method), rest.endswith("-every")


def summarize() -> str:
  """Writes ``fair.md`` (one line per budget and method: mean ± std over seeds) and
  ``accuracy_vs_bops.png`` from the rows finished with the current treatment."""
  records = []
  for path in sorted(OUT.glob("t*.json"), key=lambda p: _order(p.stem)):
    record = json.loads(path.read_text())
    if record.get("treatment") == _treatment(record["row"]):
      records.append(record)
  groups: dict[tuple, list] = {}
  for r in records:
    groups.setdefault((r["target"], r["label"]), []).append(r)
  lines = ["| FLOPs kept | method | seeds | FLOPs ratio | BOPs | BOPs ratio | pruned, before "
           "fine-tuning (test) | final test accuracy (mean ± std) | wall (s) |",
           "|---|---|---|---|---|---|---|---|---|"]
  points = []
  for (target, label), rs in groups.items():
    acc = np.array([r["final_test_accuracy"] for r in rs])
    bops = float(np.mean([r["bops"] for r in rs]))
    spread = float(acc.std(ddof=1)) if len(rs) > 1 else 0.0
    lines.append(f"| {target:.0%} | {label} | {len(rs)} | "
                 f"{np.mean([r['flops_ratio'] for r in rs]):.2f}x | {bops / 1e9:.3f} G | "
                 f"{np.mean([r['bops_ratio'] for r in rs]):.1f}x | "
                 f"{np.mean([r['pruned_test_accuracy'] for r in rs]):.4f} | "
                 f"{acc.mean():.4f}{f' ± {spread:.4f}' if len(rs) > 1 else ' (1 seed)'} | "
                 f"{np.mean([r['wall_s'] for r in rs]):.0f} |")
    points.append({"label": label, "bops": bops, "accuracy": float(acc.mean()),
                   "spread": spread})
  if records:
    base = records[0]
    plot_accuracy_vs_bops(str(OUT / "accuracy_vs_bops.png"), points,
                          {"bops": base["bops_full"], "accuracy": base["baseline_test_accuracy"]},
                          f"ResNet-20 CIFAR-10, accuracy on {fair_data.TEST_IMAGES:,} of the "
                          f"baseline's held-out images (error bar: std over seeds)")
  text = "\n".join(lines) + "\n"
  (OUT / "fair.md").write_text(text)
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", default="", help="comma-separated rows, e.g. t45-l1-unit")
  parser.add_argument("--summarize", action="store_true")
  args = parser.parse_args(argv)
  # Every row compiles the same programs: compile each once for the whole grid.
  jax.config.update("jax_compilation_cache_dir", str(ROOT / "runs" / "compress" / "jax-cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  rows = grid() if args.rows == "grid" else args.rows.split(",")
  for row in filter(None, rows):
    print(json.dumps(run_row(row)), flush=True)
  if args.summarize:
    print(summarize())
  return 0


if __name__ == "__main__":
  sys.exit(main())
