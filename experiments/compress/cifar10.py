"""CPU-scale PIC-PQ on CIFAR-10, from the committed ResNet-20 baseline.

Results and findings: experiments/compress/README.md. Command (from the repo
root):

    .venv/bin/python -m experiments.compress.cifar10 --name pic-evolved

writes ``runs/compress/<name>`` (every stage, resumable with ``--resume``) and
copies ``report.json``/``report.md``/PNGs to ``experiments/compress/results/<name>/``.
``--no-evolution``, ``--criterion l1`` and ``--allocation uniform --uniform-bits B``
give the comparisons the issue asks for at the same budget. ``--quick`` shrinks
everything to a smoke run on the bundled data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from picpq_jax.compress import CompressConfig, run_compress

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ROOT / "experiments" / "baselines" / "checkpoints" / "resnet20"
SHARED_ZIP = ROOT.parent / "shared" / "data" / "cifar10" / "train.zip"
RESULTS = Path(__file__).resolve().parent / "results"


def get_config(name: str, evolution: bool, criterion: str, quick: bool, resume: bool,
               allocation: str = "global", uniform_bits: int = 4, ft_epochs: int = 3,
               qat_epochs: int = 3, target: float = 0.45, generations: int = 8
               ) -> CompressConfig:
  """A CPU-sized budget: a small evolution, 3 + 3 epochs of fine-tuning by default."""
  if quick:
    return CompressConfig(checkpoint=str(BASELINE), data="embedded",
                          workdir=f"runs/compress/{name}-quick", population=2, sample=1,
                          generations=1, tau_hat=1, search_val_size=64, ft_epochs=1,
                          qat_epochs=1, fp_batches=1, evolution=evolution, criterion=criterion,
                          resume=resume, allocation=allocation, uniform_bits=uniform_bits)
  return CompressConfig(checkpoint=str(BASELINE), data=str(SHARED_ZIP),
                        workdir=f"runs/compress/{name}", target=target, population=8, sample=4,
                        generations=generations, tau_hat=20, search_val_size=1000,
                        ft_epochs=ft_epochs, qat_epochs=qat_epochs, evolution=evolution,
                        criterion=criterion, resume=resume, strategy="unroll",
                        allocation=allocation, uniform_bits=uniform_bits)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--name", default="pic-evolved")
  parser.add_argument("--evolution", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--criterion", default="rank")
  parser.add_argument("--allocation", default="global", choices=("global", "uniform"))
  parser.add_argument("--uniform-bits", type=int, default=4)
  parser.add_argument("--ft-epochs", type=int, default=3)
  parser.add_argument("--qat-epochs", type=int, default=3)
  parser.add_argument("--target", type=float, default=0.45, help="fraction of the FLOPs kept")
  parser.add_argument("--generations", type=int, default=8)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--resume", action="store_true")
  args = parser.parse_args(argv)
  config = get_config(args.name, args.evolution, args.criterion, args.quick, args.resume,
                      args.allocation, args.uniform_bits, args.ft_epochs, args.qat_epochs,
                      args.target, args.generations)
  start = time.time()
  report = run_compress(config)
  if not args.quick:
    out = RESULTS / args.name
    out.mkdir(parents=True, exist_ok=True)
    for f in ("report.json", "report.md", "layers.png", "evolution.png", "curves.png"):
      if (Path(config.workdir) / f).exists():
        shutil.copy(Path(config.workdir) / f, out / f)
    command = " ".join([".venv/bin/python -m experiments.compress.cifar10", *sys.argv[1:]])
    (out / "run.json").write_text(json.dumps(
        {"command": command, "wall_time_s": time.time() - start,
         "final_val_accuracy": report["final"]["val"]["accuracy"],
         "baseline_val_accuracy": report["baseline"]["val"]["accuracy"],
         "bops_ratio": report["cost"]["bops_ratio"]}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
