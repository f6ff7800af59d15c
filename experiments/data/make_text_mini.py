"""Writes the small text data that ships in picpq-jax (``picpq_jax/data/assets/text_mini``).

* ``sst2/train.tsv``: 256 sentences of each label drawn from SST-2's train.tsv,
* ``sst2/dev.tsv``: 200 of each label drawn from dev.tsv (disjoint from train.tsv),
  both by ``numpy.random.default_rng(20261206)``, kept in file order, same header;
* ``text/tinyshakespeare.txt``: the first 100,000 characters of Tiny Shakespeare.

Deterministic: rerunning it rewrites the same bytes::

  python experiments/data/make_text_mini.py --source ../shared/data \
      --out picpq_jax/data/assets/text_mini
"""

from __future__ import annotations

import argparse
import os

import numpy as np

TRAIN_PER_LABEL, DEV_PER_LABEL, SHAKESPEARE_CHARS, SEED = 256, 200, 100_000, 20261206


def _sample(lines: list[str], per_label: int, rng: np.random.Generator) -> list[str]:
  """``per_label`` lines of each label (the text after the last tab), in file order."""
  labels = np.array([line.rsplit("\t", 1)[1].strip() for line in lines])
  keep = np.concatenate([rng.permutation(np.flatnonzero(labels == label))[:per_label]
                         for label in sorted(set(labels))])
  return [lines[i] for i in np.sort(keep)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--source", default="../shared/data")
  parser.add_argument("--out", default="picpq_jax/data/assets/text_mini")
  args = parser.parse_args()
  rng = np.random.default_rng(SEED)
  os.makedirs(os.path.join(args.out, "sst2"), exist_ok=True)
  for name, per_label in (("train.tsv", TRAIN_PER_LABEL), ("dev.tsv", DEV_PER_LABEL)):
    with open(os.path.join(args.source, "sst2", name), encoding="utf-8") as f:
      header, *lines = f.read().splitlines()
    with open(os.path.join(args.out, "sst2", name), "w", encoding="utf-8") as f:
      f.write("\n".join([header, *_sample(lines, per_label, rng)]) + "\n")
  os.makedirs(os.path.join(args.out, "text"), exist_ok=True)
  with open(os.path.join(args.source, "text", "tinyshakespeare.txt"), encoding="utf-8") as f:
    text = f.read()[:SHAKESPEARE_CHARS]
  with open(os.path.join(args.out, "text", "tinyshakespeare.txt"), "w", encoding="utf-8") as f:
    f.write(text)


if __name__ == "__main__":
  main()
