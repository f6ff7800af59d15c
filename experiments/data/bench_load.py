"""Times loading an image-folder zip: the first (decoding) and a cached call.

Writes ``bench_load.json`` and ``bench_load.md`` to ``--out_dir``. Run from the
repository root::

  python experiments/data/bench_load.py \
      --source ../shared/data/cifar10/train.zip --out_dir experiments/data

A fresh temporary cache is used, so the first call always decodes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from picpq_jax.data import load_image_folder


def bench(source: Path, split: str) -> dict:
  """Seconds for a cold (decoding) and a warm (cached) load of ``source``."""
  with tempfile.TemporaryDirectory() as cache:
    start = time.perf_counter()
    cold = load_image_folder(source, split=split, cache_dir=cache)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = load_image_folder(source, split=split, cache_dir=cache)
    warm_s = time.perf_counter() - start
    identical = bool(np.array_equal(cold.images, warm.images)
                     and np.array_equal(cold.labels, warm.labels))
  return {
      "source": str(source), "split": split, "images": len(cold),
      "image_shape": list(cold.image_shape), "classes": cold.num_classes,
      "decode_s": round(cold_s, 2), "cached_s": round(warm_s, 2),
      "identical": identical, "cpus": os.cpu_count(),
      "machine": platform.platform(),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", type=Path,
                      default=Path("../shared/data/cifar10/train.zip"))
  parser.add_argument("--split", default="train")
  parser.add_argument("--out_dir", type=Path, default=Path("experiments/data"))
  args = parser.parse_args()
  result = bench(args.source, args.split)
  args.out_dir.mkdir(parents=True, exist_ok=True)
  (args.out_dir / "bench_load.json").write_text(json.dumps(result, indent=2))
  (args.out_dir / "bench_load.md").write_text(
      "# Image-folder load time\n\n"
      f"`{result['source']}` [{result['split']}]: {result['images']:,} images "
      f"{'x'.join(map(str, result['image_shape']))}, {result['classes']} "
      f"classes, on {result['cpus']} CPUs.\n\n"
      "| load | seconds |\n| --- | --- |\n"
      f"| first (decode + write cache) | {result['decode_s']} |\n"
      f"| second (from .npy cache) | {result['cached_s']} |\n\n"
      f"Arrays identical bit for bit: {result['identical']}.\n")
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
