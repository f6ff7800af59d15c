"""Learning-rate schedules and the reference optimizer (SGD, Nesterov, weight decay)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def multistep_schedule(base_lr: float, total_steps: int,
                       milestones: Sequence[float] = (0.3, 0.6, 0.8),
                       gamma: float = 0.2) -> optax.Schedule:
  """``base_lr``, multiplied by ``gamma`` at each milestone (fractions of ``total_steps``).

  The reference fine-tuning schedule: x0.2 at 30%, 60% and 80% of training.
  """
  boundaries = {int(round(m * total_steps)): gamma for m in milestones}
  return optax.piecewise_constant_schedule(base_lr, boundaries)


def cosine_schedule(base_lr: float, total_steps: int, warmup_steps: int = 0,
                    end_lr: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 for ``warmup_steps``, then cosine decay to ``end_lr`` at
  ``total_steps`` (CRNet's ``WarmUpCosineAnnealingLR`` with ``eta_min = end_lr``)."""
  if warmup_steps:
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps, total_steps, end_lr)
  return optax.cosine_decay_schedule(base_lr, total_steps, alpha=end_lr / base_lr)


def make_schedule(name: str, base_lr: float, total_steps: int, warmup_steps: int = 0,
                  milestones: Sequence[float] = (0.3, 0.6, 0.8),
                  gamma: float = 0.2, end_lr: float = 0.0) -> optax.Schedule:
  """Schedule by name: ``"multistep"``, ``"cosine"`` (``end_lr`` at the end) or
  ``"constant"``."""
  if name == "multistep":
    return multistep_schedule(base_lr, total_steps, milestones, gamma)
  if name == "cosine":
    return cosine_schedule(base_lr, total_steps, warmup_steps, end_lr)
  if name == "constant":
    return optax.constant_schedule(base_lr)
  raise ValueError(f"unknown schedule {name!r}: use multistep, cosine or constant")


def step_rates(schedule: optax.Schedule, first: int, count: int) -> jax.Array:
  """float32 ``[count]``: ``schedule`` at steps ``first .. first + count - 1`` (a round's
  local steps; a constant schedule, which returns a scalar, broadcast too)."""
  steps = first + np.arange(count)
  return jnp.broadcast_to(jnp.asarray(schedule(steps), jnp.float32), steps.shape)


def sgd_nesterov(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9,
                 weight_decay: float = 5e-4, nesterov: bool = True) -> optax.GradientTransformation:
  """PyTorch's ``SGD(momentum, nesterov, weight_decay)``: decay is added to the
  gradient before momentum, on every parameter (as the reference does)."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
