"""CPU-scale baselines: CIFAR ResNets on the shared CIFAR-10 (45,000 train / 5,000 val).

The starting points of the compression experiments. Command (from the repo root):

    .venv/bin/python -m experiments.baselines.cifar10 --arch resnet20 --epochs 12

writes ``experiments/baselines/results/<arch>.json`` and ``.md`` and keeps the run
(Orbax checkpoints, metrics.jsonl) in ``runs/baselines/<arch>``. ``--quick`` trains
for a few steps on the bundled 5,000-image subset instead, to check the script.

The checkpoint is a :class:`picpq_jax.train.TrainState` saved by
:class:`picpq_jax.train.Checkpoints`: ``<workdir>/checkpoints/<step>/state`` (Orbax
standard format: ``step``, ``params``, ``batch_stats``, ``masks``, ``quant``,
``opt_state``) and ``<workdir>/checkpoints/<step>/meta`` (JSON: the run's config,
class names, the per-channel normalization used). Restore it with
``Checkpoints(dir).restore(template_state)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax

from picpq_jax.train import TrainConfig, read_jsonl, train_and_evaluate

ROOT = Path(__file__).resolve().parents[2]
SHARED_ZIP = ROOT.parent / "shared" / "data" / "cifar10" / "train.zip"
RESULTS = Path(__file__).resolve().parent / "results"


def get_config(arch: str, epochs: int, quick: bool) -> TrainConfig:
  """The reference-style recipe at CPU scale: SGD-Nesterov 0.9, wd 5e-4, cosine."""
  if quick:
    return TrainConfig(arch=arch, data="embedded", workdir=f"runs/baselines/{arch}-quick",
                       epochs=1, batch_size=64, val_size=500, progress=False)
  return TrainConfig(arch=arch, data=str(SHARED_ZIP), workdir=f"runs/baselines/{arch}",
                     val_size=5000, epochs=epochs, batch_size=128, lr=0.1, schedule="cosine",
                     momentum=0.9, weight_decay=5e-4, seed=0, checkpoint_every=351,
                     resume=True)


def _markdown(results: dict, command: str, curve: list[dict]) -> str:
  rows = "\n".join(f"| {r['epoch']} | {r['val_loss']:.4f} | {r['val_accuracy']:.4f} |"
                   for r in curve)
  return (f"# {results['arch']} on CIFAR-10 (CPU-scale baseline)\n\n"
          f"Command: `{command}`\n\n"
          f"- data: {results['num_train']} training / {results['num_val']} validation images "
          f"(shared train.zip, seeded split)\n"
          f"- epochs: {results['epochs']} ({results['steps']} steps of batch "
          f"{results['batch_size']}), wall time {results['wall_time_s'] / 60:.1f} min on "
          f"{results['devices']}\n"
          f"- **validation accuracy {results['val_accuracy']:.4f}**, loss {results['val_loss']:.4f}\n"
          f"- parameters {results['params']:,}, MACs/image {results['macs_per_example']:,}\n"
          f"- checkpoint: `{os.path.relpath(results['checkpoint_dir'], ROOT)}` "
          f"(step {results['checkpoint_step']})\n\n"
          f"| epoch | val loss | val accuracy |\n|---|---|---|\n{rows}\n")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="resnet20")
  parser.add_argument("--epochs", type=int, default=12)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args(argv)
  config = get_config(args.arch, args.epochs, args.quick)
  results = train_and_evaluate(config)
  curve = [r for r in read_jsonl(os.path.join(config.workdir, "metrics.jsonl")) if "val_loss" in r]
  command = " ".join([".venv/bin/python -m experiments.baselines.cifar10", *sys.argv[1:]])
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=ROOT).stdout.strip()
  record = {**results, "command": command, "commit": commit, "curve": curve,
            "jax": jax.__version__, "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d")}
  if not args.quick:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.arch}.json").write_text(json.dumps(record, indent=2))
    (RESULTS / f"{args.arch}.md").write_text(_markdown(results, command, curve))
  return 0


if __name__ == "__main__":
  sys.exit(main())
