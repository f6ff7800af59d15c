"""The pretrained model that ships inside picpq-jax: a CIFAR-10 ResNet-20.

``picpq compress --from embedded`` (and every other ``--from``) reads it: the
committed 12-epoch baseline (0.8402 on 5,000 held-out CIFAR-10 training images),
model variables only, with metadata that points at the embedded 5,000 images and a
500-image validation split of them. Made by
``experiments/baselines/package_pretrained.py``.
"""

from __future__ import annotations

import os

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resnet20_cifar10")
QUICKSTART_VAL_SIZE = 500  # validation images of the embedded 5,000
EMBEDDED = "embedded"  # the --from value that names it


def resolve(path: str) -> str:
  """``"embedded"`` -> the bundled ResNet-20's folder; any other path unchanged."""
  return PRETRAINED_DIR if path == EMBEDDED else path
