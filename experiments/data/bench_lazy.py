"""Throughput of lazy tfds images: label scan, evaluation decode, training crop.

Builds a synthetic ImageNet-like dataset in tfds ArrayRecord format (JPEGs at
ImageNet's common sizes, quality 90, written offline without TensorFlow), loads
it with ``load_tfds(..., lazy=True)`` and times, per thread count:

- ``labels``: the one pass that reads every record's label;
- ``decode``: Pillow decoding the raw JPEG bytes, nothing else (the floor);
- ``eval``: ``images[idx]``: decode, resize 256, center-crop 224;
- ``train``: ``images.draw(idx, ...)``: decode, random-resized crop to 224, flip.

Writes ``bench_lazy.json`` and ``bench_lazy.md`` to ``--out_dir``; each figure
is the median of ``--repeats`` passes over the images. Run from the repository
root::

  python -m experiments.data.bench_lazy --out_dir experiments/data
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

# ImageNet's most common sizes (W, H) and a few large ones, cycled through.
SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (333, 500), (500, 375),
         (640, 480), (500, 375), (1024, 768), (500, 500))


def _jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
  """A JPEG (quality 90) of smooth colour blobs plus pixel noise."""
  coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
  noisy = smooth.astype(np.int16) + rng.integers(-12, 13, smooth.shape, dtype=np.int16)
  buf = io.BytesIO()
  Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def build(data_dir: str, num_images: int) -> str:
  """Writes the synthetic dataset ``picpq_bench_jpegs`` to ``data_dir``."""
  import tensorflow_datasets as tfds

  class PicpqBenchJpegs(tfds.core.GeneratorBasedBuilder):
    """Synthetic ImageNet-like JPEGs, 10 classes."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      for i in range(num_images):
        width, height = SIZES[i % len(SIZES)]
        yield i, {"image": _jpeg(rng, width, height), "label": i % 10}

  PicpqBenchJpegs(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return "picpq_bench_jpegs"


def _median_rate(fn, count: int, repeats: int) -> float:
  """Items per second of ``fn()`` (which handles ``count`` items), median."""
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    rates.append(count / (time.perf_counter() - start))
  return statistics.median(rates)


def bench(num_images: int, threads: list[int], repeats: int, size: int) -> dict:
  import tensorflow_datasets as tfds

  from picpq_jax.data import lazy as lazy_lib
  from picpq_jax.data import load_tfds, tfds_source
  from picpq_jax.data.lazy import RandomResizedCrop

  rows = []
  load_before = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    name = build(tmp, num_images)
    build_s = time.perf_counter() - start
    for workers in threads:
      os.environ["PICPQ_DECODE_THREADS"] = str(workers)
      ds = load_tfds(name, data_dir=tmp, image_size=size, center_crop=0.875, lazy=True,
                     cache_dir=os.path.join(tmp, "cache"))
      raw = tfds_source._raw_source(tfds, name, "train", tmp)  # pylint: disable=protected-access
      records = [raw[i]["image"] for i in range(len(ds))]
      mean_bytes = float(np.mean([len(r) for r in records]))
      idx = np.arange(len(ds))
      train = ds.images.with_augment(RandomResizedCrop(size))

      def decode_only():
        lazy_lib.parallel_map(lambda r: np.asarray(Image.open(io.BytesIO(r)).convert("RGB")),
                              records, workers)

      epoch = iter(range(10**6))
      rows.append({
          "threads": workers,
          "labels_per_s": _median_rate(
              lambda: tfds_source._read_labels(raw, name), len(ds), repeats),
          "decode_per_s": _median_rate(decode_only, len(ds), repeats),
          "eval_per_s": _median_rate(lambda: ds.images[idx], len(ds), repeats),
          "train_per_s": _median_rate(lambda: train.draw(idx, 0, next(epoch)), len(ds), repeats),
      })
  return {
      "images": num_images, "sizes": [list(s) for s in SIZES], "mean_jpeg_bytes": mean_bytes,
      "output_size": size, "build_s": round(build_s, 2), "repeats": repeats, "rows": rows,
      "cpus": os.cpu_count(), "machine": platform.platform(),
      "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
      "processor": platform.processor() or platform.machine(),
  }


def markdown(result: dict) -> str:
  lines = [
      "# Lazy tfds decode throughput",
      "",
      f"{result['images']} synthetic JPEGs in tfds ArrayRecord format (sizes cycled from "
      f"{', '.join(f'{w}x{h}' for w, h in result['sizes'])}; mean "
      f"{result['mean_jpeg_bytes'] / 1e3:.0f} KB), output {result['output_size']} px, "
      f"median of {result['repeats']} passes, {result['cpus']} CPUs "
      f"({result['machine']}; 1-minute load average {result['load_average_1min'][0]} before, "
      f"{result['load_average_1min'][1]} after: the CPUs were shared, so the figures are "
      "noisy and thread scaling is understated).",
      "",
      "| threads | labels/s | decode only, img/s | eval (resize 256, crop 224), img/s "
      "| train (random-resized crop, flip), img/s |",
      "| --- | --- | --- | --- | --- |",
  ]
  for row in result["rows"]:
    lines.append(f"| {row['threads']} | {row['labels_per_s']:.0f} | {row['decode_per_s']:.0f} "
                 f"| {row['eval_per_s']:.0f} | {row['train_per_s']:.0f} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=200)
  parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--out_dir", default="experiments/data")
  args = parser.parse_args()
  result = bench(args.images, [int(t) for t in args.threads.split(",")], args.repeats,
                 args.size)
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "bench_lazy.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  text = markdown(result)
  with open(os.path.join(args.out_dir, "bench_lazy.md"), "w", encoding="utf-8") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
