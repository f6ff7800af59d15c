"""The data of the fair comparison: a training subset and the baseline's held-out images.

    .venv/bin/python -m experiments.compress.fair_data

writes ``runs/compress/fair-data.zip`` laid out as ``<split>/<class>/<n>.png``:

* ``test/``: 2,000 of the 5,000 images the committed ResNet-20 baseline held out
  of ``../shared/data/cifar10/train.zip`` (``val_size`` 5,000, seed 0; the first
  of a seed-2 permutation): it never trained on them, and the comparison chooses
  nothing on them (a binomial standard error of about 1 point at 60-70%);
* ``train/``: 2,500 of the baseline's training images (the first of a seed-1
  permutation). The comparison runs ``picpq compress --val-size 500``, which
  carves a 500-image validation split (reported, never chosen on) and the
  search split out of them, so a fine-tuning epoch is 2,000 images: small enough
  for every row of the grid on a shared 2-core CPU.

PNG is lossless, so the test images are the baseline's held-out pixels exactly.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from picpq_jax import data as pdata

ROOT = Path(__file__).resolve().parents[2]
SHARED_ZIP = ROOT.parent / "shared" / "data" / "cifar10" / "train.zip"
BASELINE_CONFIG = ROOT / "experiments" / "baselines" / "checkpoints" / "resnet20" / "config.json"
OUT = ROOT / "runs" / "compress" / "fair-data.zip"
TRAIN_IMAGES = 2500
TEST_IMAGES = 2000


def main() -> int:
  meta = json.loads(BASELINE_CONFIG.read_text())
  dataset = pdata.load_dataset(str(SHARED_ZIP), split="train")
  train, held_out = pdata.train_val_split(dataset, meta["val_size"], meta["seed"])
  subset = train.subset(np.sort(np.random.default_rng(1).permutation(len(train))[:TRAIN_IMAGES]))
  held_out = held_out.subset(
      np.sort(np.random.default_rng(2).permutation(len(held_out))[:TEST_IMAGES]))
  OUT.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(OUT, "w", zipfile.ZIP_STORED) as z:
    for split, ds in (("train", subset), ("test", held_out)):
      for i, (image, label) in enumerate(zip(ds.images, ds.labels)):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        z.writestr(f"{split}/{ds.class_names[label]}/{i:05d}.png", buf.getvalue())
  print(f"{OUT}: train {len(subset)}, test {len(held_out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
