"""The configuration of ``picpq train``: one frozen dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Any

from picpq_jax.options import check, option

SCHEDULES = ("multistep", "cosine", "constant")
# = picpq_jax.data.AUGMENTATIONS (not imported here: picpq_jax.data loads jax).
AUGMENTATIONS = ("cifar", "imagenet")
# Ways the train step computes conv inputs (picpq_jax.train.steps.train_step).
CONV_INPUTS = ("fused", "materialized")
# = picpq_jax.models.DTYPES (not imported here, as above).
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Options of a training run; ``metadata["help"]`` of each field is its ``--help``."""

  arch: str = option("resnet20", "architecture name (see `picpq models`)")
  data: str = option("embedded", "'embedded' (bundled 5,000 CIFAR-10 images), a folder or .zip of <split>/<class>/<file>, a cifar-10-batches-py folder, or tfds:NAME")
  image_size: int | None = option(None, "tfds:NAME data only: resize and center-crop images to this square size (needed for tfds:imagenet2012; large datasets decode lazily, per batch)")
  augment: str = option("cifar", "training augmentation: cifar (pad-4 random crop + flip, on device) or imagenet (random-resized crop, area 0.08-1, aspect 3/4-4/3, + flip, on the host; evaluation images are the center 0.875 of images resized to size/0.875, i.e. 224 of 256)")
  workdir: str = option("runs/train", "where checkpoints, metrics.jsonl and results.json go", may_change=True)
  val_size: int = option(500, "images held out from the training split for validation")
  epochs: int = option(4, "passes over the training images", may_change=True)
  batch_size: int = option(128, "global batch size; must divide across devices and hosts")
  lr: float = option(0.1, "peak learning rate")
  schedule: str = option("cosine", "multistep (x0.2 at 30/60/80%), cosine or constant")
  warmup_epochs: float = option(0.0, "linear warm-up (cosine schedule only)")
  momentum: float = option(0.9, "Nesterov momentum")
  weight_decay: float = option(5e-4, "L2 weight decay added to the gradients")
  seed: int = option(0, "seed of the split, shuffling, augmentation and initialization")
  checkpoint_every: int = option(200, "save a checkpoint every N steps (and always at the end)", may_change=True)
  keep_checkpoints: int = option(2, "how many recent checkpoints to keep", may_change=True)
  resume: bool = option(False, "continue from the newest checkpoint in workdir", may_change=True)
  cache_dir: str | None = option(None, "cache of decoded images (default $PICPQ_CACHE or ~/.cache/picpq_jax)", may_change=True)
  progress: bool = option(True, "show a progress bar", may_change=True)
  conv_inputs: str = option("fused", "train-step performance switch, same numerics: fused (XLA's default) or materialized (each conv input stored once instead of recomputed in the backward pass; a ResNet-56 step on a 2-core CPU ran 2.3x faster, see experiments/bench/RESULTS.md)", may_change=True)
  dtype: str = option("float32", "computation dtype of the conv and dense products: float32 or bfloat16 (mixed precision: the products accumulate in float32, and parameters, optimizer state, batch norm and the loss stay float32; on a 2-core AVX-512-BF16 CPU a ResNet-56 step took 0.74 s against 1.98 s in float32, VGG-16 gained nothing, see experiments/bench/RESULTS.md)")

  def __post_init__(self):
    check(self.val_size >= 0, "val_size", self.val_size, "an integer >= 0")
    check(self.image_size is None or self.image_size >= 1, "image_size", self.image_size,
          "an integer >= 1")
    check(self.augment in AUGMENTATIONS, "augment", self.augment, " or ".join(AUGMENTATIONS))
    check(1 <= self.epochs <= 10_000, "epochs", self.epochs, "1..10000")
    check(1 <= self.batch_size <= 65_536, "batch_size", self.batch_size, "1..65536")
    check(0.0 < self.lr <= 10.0, "lr", self.lr, "(0, 10]")
    check(self.schedule in SCHEDULES, "schedule", self.schedule, " or ".join(SCHEDULES))
    check(0.0 <= self.warmup_epochs < self.epochs, "warmup_epochs", self.warmup_epochs,
           f"[0, epochs={self.epochs})")
    check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "[0, 1)")
    check(0.0 <= self.weight_decay < 1.0, "weight_decay", self.weight_decay, "[0, 1)")
    check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
    check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "an integer >= 1")
    check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
    check(self.conv_inputs in CONV_INPUTS, "conv_inputs", self.conv_inputs, " or ".join(CONV_INPUTS))
    check(self.dtype in DTYPES, "dtype", self.dtype, " or ".join(DTYPES))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

