"""Paper-scale PIC-PQ runs, for an accelerator: the baseline, then the compression.

Each config is two `picpq` commands: `train` (the pretrained baseline) and
`compress` (PIC-PQ from it, with the reference settings of DESIGN.md: population
64, sample 16, 400 generations, `tau_hat` 200, 30 + 30 fine-tuning epochs,
penalty 1/6, the published max bits where there are some). Print them, or run
one config's stages in order (each resumes where it stopped):

    .venv/bin/python -m experiments.compress.paper --list
    .venv/bin/python -m experiments.compress.paper resnet56-cifar10 --run
    .venv/bin/python -m experiments.compress.paper resnet18-imagenet --run --stage compress

The data are tensorflow-datasets prepared in array_record format
(`tfds build cifar10 --file_format=array_record`; ImageNet needs its archives in
`$TFDS_DATA_DIR/downloads/manual` first), read from `$TFDS_DATA_DIR`; `--data`
points the CIFAR-10 configs at another copy, e.g. `../shared/data/cifar10/train.zip`.
Validation images are carved out of the training split (`--val-size`), as in
the CPU-scale experiment, so the reported accuracy is validation accuracy.
None of these has been run in this repository yet (they need an accelerator).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import NamedTuple


class PaperConfig(NamedTuple):
  """One paper-scale experiment: the baseline's and the compression's options."""

  train: tuple[str, ...]
  compress: tuple[str, ...]
  note: str


# Baselines: SGD Nesterov, cosine from 0.1, weight decay 5e-4 (the library's defaults).
CONFIGS: dict[str, PaperConfig] = {
    "resnet56-cifar10": PaperConfig(
        train=("--arch", "resnet56", "--data", "tfds:cifar10", "--val-size", "5000",
               "--epochs", "200", "--lr", "0.1", "--schedule", "cosine"),
        compress=("--target", "0.45"),
        note="paper: 54.96x BOPs at a 0.10-point drop (remove 55% of FLOPs, published max bits)"),
    "vgg16-cifar10": PaperConfig(
        train=("--arch", "vgg16", "--data", "tfds:cifar10", "--val-size", "5000",
               "--epochs", "200", "--lr", "0.05", "--schedule", "cosine"),
        compress=("--target", "0.45"),
        note="published max bits [32] + [8]*3 + [6]*3 + [4]*6; target as ResNet-56's"),
    "mobilenetv2-cifar100": PaperConfig(
        train=("--arch", "mobilenetv2", "--data", "tfds:cifar100", "--val-size", "5000",
               "--epochs", "200", "--lr", "0.1", "--schedule", "cosine"),
        compress=("--target", "0.55"),
        note="max bits from the depth-thirds rule (first conv 32, then 8/6/4)"),
    "resnet18-imagenet": PaperConfig(
        train=("--arch", "resnet18", "--data", "tfds:imagenet2012", "--image-size", "224",
               "--augment", "imagenet", "--val-size", "50000", "--epochs", "90",
               "--batch-size", "256", "--lr", "0.1", "--weight-decay", "1e-4",
               "--schedule", "cosine", "--warmup-epochs", "5"),
        compress=("--target", "0.45", "--batch-size", "256", "--ft-epochs", "10",
                  "--qat-epochs", "10", "--fp-batch-size", "64"),
        note="paper: 53.24x BOPs at a 0.61-point drop; fewer fine-tuning epochs (ImageNet)"),
}


def commands(name: str, data: str | None = None) -> dict[str, list[str]]:
  """The `picpq train` and `picpq compress` command lines of config ``name``."""
  config = CONFIGS[name]
  train = list(config.train)
  if data is not None:
    train[train.index("--data") + 1] = data
  workdir = f"runs/paper/{name}"
  return {
      "train": [".venv/bin/picpq", "train", *train, "--workdir", f"{workdir}/baseline"],
      "compress": [".venv/bin/picpq", "compress", "--from", f"{workdir}/baseline",
                   *config.compress, "--workdir", f"{workdir}/compress"],
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("name", nargs="?", choices=sorted(CONFIGS))
  parser.add_argument("--list", action="store_true", help="print every config's commands")
  parser.add_argument("--run", action="store_true", help="run the stages (else print them)")
  parser.add_argument("--stage", choices=("all", "train", "compress"), default="all")
  parser.add_argument("--data", default=None, help="replaces the config's --data")
  args = parser.parse_args(argv)
  if args.list or args.name is None:
    for name, config in CONFIGS.items():
      print(f"# {name}: {config.note}")
      for line in commands(name, args.data).values():
        print(shlex.join(line))
    return 0
  stages = ("train", "compress") if args.stage == "all" else (args.stage,)
  for stage in stages:
    line = commands(args.name, args.data)[stage]
    print(shlex.join(line), flush=True)
    if args.run:
      # --resume continues a stopped stage and starts an absent one afresh.
      code = subprocess.call([*line, "--resume"])
      if code:
        return code
  return 0


if __name__ == "__main__":
  sys.exit(main())
