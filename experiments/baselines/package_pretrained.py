"""Packages the committed ResNet-20 baseline as the pretrained model inside picpq-jax.

Reads ``experiments/baselines/checkpoints/resnet20`` (CIFAR-10, trained on 45,000 of
the 50,000 training images, 0.8402 on the other 5,000), keeps only the model's
variables (no optimizer state), and saves them with the engine's checkpoint writer
into ``picpq_jax/pretrained/resnet20_cifar10`` with metadata that points at the
embedded data: ``data="embedded"`` and a 500-image validation split (seed 0) of the
5,000 bundled images, so ``picpq compress --from embedded`` runs with no download.

The bundled images are CIFAR-10 *training* images, so most of that validation split
was seen by the baseline in training. The script counts how many, by file name, and
writes the count to ``experiments/baselines/results/pretrained_overlap.json``::

  python experiments/baselines/package_pretrained.py --source-data ../shared/data/cifar10/train.zip
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import shutil
import zipfile

import numpy as np

from picpq_jax import data as pdata
from picpq_jax.data.embedded import EMBEDDED_ASSET
from picpq_jax.engine import artifacts
from picpq_jax.engine.checkpoints import Checkpoints
from picpq_jax.pretrained import PRETRAINED_DIR, QUICKSTART_VAL_SIZE

HERE = os.path.dirname(os.path.abspath(__file__))


def _image_names(zip_path: str) -> list[str]:
  """``train/<class>/<file>`` of every image, in the order load_image_folder reads them."""
  with zipfile.ZipFile(zip_path) as z:
    return sorted(n for n in z.namelist() if n.startswith("train/") and not n.endswith("/"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--source", default=os.path.join(HERE, "checkpoints", "resnet20"))
  parser.add_argument("--source-data", default="",
                      help="the full CIFAR-10 train.zip the baseline used (for the overlap count)")
  args = parser.parse_args()
  trained = artifacts.load_trained(args.source)
  base = trained.meta["config"]
  meta = {
      **trained.meta,
      "config": {**base, "data": "embedded", "val_size": QUICKSTART_VAL_SIZE, "seed": 0,
                 "workdir": "", "cache_dir": None},
      "num_train": 5000 - QUICKSTART_VAL_SIZE, "num_val": QUICKSTART_VAL_SIZE,
      "pretrained_from": {"data": "CIFAR-10 training set, 45,000 images (val_size 5000, "
                                  "seed 0)", "val_accuracy": 0.8402,
                          "epochs": base["epochs"], "step": trained.step},
  }
  shutil.rmtree(PRETRAINED_DIR, ignore_errors=True)
  checkpoints = Checkpoints(os.path.join(PRETRAINED_DIR, "checkpoints"))
  checkpoints.save(trained.step, trained.variables, meta, force=True)
  checkpoints.close()
  print(f"wrote {PRETRAINED_DIR}")

  if args.source_data:  # which of the quick start's validation images the baseline saw
    full = _image_names(args.source_data)
    held_out = {full[i] for i in _val_indices(len(full), base["val_size"], base["seed"])}
    mini = _image_names(str(importlib.resources.files("picpq_jax.data") / "assets" /
                            EMBEDDED_ASSET))
    val_names = [mini[i] for i in _val_indices(len(mini), QUICKSTART_VAL_SIZE, 0)]
    unseen = sum(n in held_out for n in val_names)
    record = {"quickstart_val_images": len(val_names),
              "held_out_from_baseline_training": unseen,
              "seen_in_baseline_training": len(val_names) - unseen}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "pretrained_overlap.json"), "w") as f:
      json.dump(record, f, indent=2)
    print(record)


def _val_indices(n: int, val_size: int, seed: int) -> np.ndarray:
  """The indices of the validation split ``train_val_split`` draws from n examples."""
  ds = pdata.ImageDataset(np.zeros((n, 1, 1, 3), np.uint8), np.arange(n, dtype=np.int32),
                          tuple(map(str, range(n))))
  return pdata.train_val_split(ds, val_size, seed)[1].labels


if __name__ == "__main__":
  main()
