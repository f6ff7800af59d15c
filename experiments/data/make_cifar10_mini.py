"""Makes picpq_jax/data/assets/cifar10_mini.zip, the dataset the package ships.

500 images per class (5,000 in all) drawn with a fixed seed from the CIFAR-10
training split in image-folder form, copying each original JPEG's bytes (no
re-encoding) into a stored (uncompressed) zip with the same
``train/<class>/<file>`` layout. Member order and timestamps are fixed, so the
same source gives the same zip byte for byte.

Run from the repository root::

  python experiments/data/make_cifar10_mini.py \
      --source ../shared/data/cifar10/train.zip \
      --out picpq_jax/data/assets/cifar10_mini.zip
"""

from __future__ import annotations

import argparse
import hashlib
import zipfile
from pathlib import Path

import numpy as np

SEED = 20240601
PER_CLASS = 500
_EPOCH = (1980, 1, 1, 0, 0, 0)  # A fixed timestamp for reproducible zips.


def choose_members(names: list[str], per_class: int, seed: int) -> list[str]:
  """``per_class`` sorted member names per class, drawn with ``seed``.

  Args:
    names: zip member names; images are ``train/<class>/<file>``.
    per_class: images kept per class.
    seed: seed of the numpy generator; classes are drawn in sorted order.
  """
  by_class: dict[str, list[str]] = {}
  for name in names:
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "train" and parts[2]:
      by_class.setdefault(parts[1], []).append(name)
  rng = np.random.default_rng(seed)
  chosen = []
  for cls in sorted(by_class):
    files = sorted(by_class[cls])
    picks = rng.choice(len(files), size=per_class, replace=False)
    chosen += sorted(files[i] for i in picks)
  return chosen


def make_mini(source: Path, out: Path, per_class: int = PER_CLASS,
              seed: int = SEED) -> list[str]:
  """Writes the mini zip to ``out``; returns the member names written."""
  with zipfile.ZipFile(source) as src:
    members = choose_members(src.namelist(), per_class, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
      for name in members:
        info = zipfile.ZipInfo(name, date_time=_EPOCH)
        info.external_attr = 0o644 << 16
        dst.writestr(info, src.read(name), zipfile.ZIP_STORED)
    tmp.replace(out)
  return members


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", type=Path,
                      default=Path("../shared/data/cifar10/train.zip"))
  parser.add_argument("--out", type=Path,
                      default=Path("picpq_jax/data/assets/cifar10_mini.zip"))
  parser.add_argument("--per_class", type=int, default=PER_CLASS)
  parser.add_argument("--seed", type=int, default=SEED)
  args = parser.parse_args()
  members = make_mini(args.source, args.out, args.per_class, args.seed)
  digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
  print(f"wrote {args.out}: {len(members)} images, "
        f"{args.out.stat().st_size:,} bytes, sha256 {digest}")


if __name__ == "__main__":
  main()
