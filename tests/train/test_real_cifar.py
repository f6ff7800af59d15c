"""End to end on real CIFAR-10 images from ../shared: ResNet-20's training loss falls
within a handful of steps of the library's own pipeline (augment, normalize, step)."""

import functools

import jax
import numpy as np

from picpq_jax import data, models
from picpq_jax.train import create_train_state, sgd_nesterov, train_step
from tests.conftest import CIFAR10_ZIP, require


def test_resnet20_training_loss_falls_on_real_cifar10(cache_dir):
  dataset = data.load_image_folder(require(CIFAR10_ZIP), cache_dir=cache_dir)
  train, _ = data.train_val_split(dataset, 5000, seed=0)
  subset = train.subset(np.arange(256))  # 8 batches of 32, seen twice
  mean, std = data.channel_stats(train.images)

  model = models.get_model("resnet20")
  tx = sgd_nesterov(0.05)
  state = create_train_state(models.init_variables(model, jax.random.key(0), (32, 32, 3)), tx)

  @jax.jit
  def step(state, key, images, labels):
    x = data.normalize(data.augment(key, images), mean, std)
    return train_step(state, x, labels, model=model, tx=tx)

  losses = []
  batches = data.iterate_batches(subset, 32, seed=0)
  for i in range(16):
    batch = next(batches)
    state, metrics = step(state, jax.random.key(i), batch["image"], batch["label"])
    losses.append(float(metrics["loss"]))
  first, last = np.mean(losses[:8]), np.mean(losses[8:])
  assert np.isfinite(losses).all()
  assert last < first - 0.1, losses
