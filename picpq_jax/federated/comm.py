"""Exact communication cost, counted from array shapes and dtypes.

"Up" is client to server, "down" server to client. A round's traffic is the sum over
its participating clients. Every count is the payload in bytes: ``size * itemsize``
for a plain array, or ``ceil(size * bits / 8) + 8`` for a message quantized to
``bits`` (packed ``bits``-bit codes, plus its range as two float32 numbers; see
:mod:`picpq_jax.federated.quantize`). Protocol framing is not counted.

What each method sends per participating client and round (``E`` local steps):

* **split** (SplitFed-V1 and the sequential server): each step, up the smashed data
  ``[B, h, w, c]`` and the labels ``[B]``; down the smashed data's gradient. Once per
  round, down the averaged client part and up the trained one (``params`` and
  ``batch_stats``, plus the optimizer state when it is averaged too).
* **fedavg**: once per round, the whole model down and back up.
* **centralized**: no rounds of traffic; the clients upload their raw training data
  (uint8 images and int32 labels) once, counted in round 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from picpq_jax.models.quantizer import FULL_PRECISION_BITS
from picpq_jax.utils import tree_bytes  # noqa: F401  (re-exported)

RANGE_BYTES = 8  # lo and hi of a quantized message, two float32 numbers


def message_bytes(shape: tuple[int, ...], dtype: Any, bits: int = FULL_PRECISION_BITS) -> int:
  """Bytes of one array on the wire: raw, or packed to ``bits`` per value plus its range."""
  size = math.prod(shape)
  if bits >= FULL_PRECISION_BITS:
    return size * np.dtype(dtype).itemsize
  return -(-size * bits // 8) + RANGE_BYTES


@dataclasses.dataclass(frozen=True)
class Traffic:
  """Bytes of one round, by direction and by what was sent (``{name: bytes}``)."""

  up: dict[str, int]
  down: dict[str, int]

  @property
  def up_bytes(self) -> int:
    return sum(self.up.values())

  @property
  def down_bytes(self) -> int:
    return sum(self.down.values())

  @property
  def total_bytes(self) -> int:
    return self.up_bytes + self.down_bytes

  def to_dict(self) -> dict[str, Any]:
    return {"up": dict(self.up), "down": dict(self.down), "up_bytes": self.up_bytes,
            "down_bytes": self.down_bytes, "total_bytes": self.total_bytes}


def split_traffic(smashed: jax.ShapeDtypeStruct, labels: jax.ShapeDtypeStruct,
                  client_state: Any, participants: int, local_steps: int,
                  bits: int = FULL_PRECISION_BITS) -> Traffic:
  """One round of split training (SplitFed-V1 or sequential server).

  Args:
    smashed: one client's smashed batch, ``[B, h, w, c]`` float32.
    labels: one client's label batch, ``[B]`` int32.
    client_state: what the clients synchronize each round (arrays or shapes).
    participants: M, clients in the round.
    local_steps: E.
    bits: bits per value of the smashed data and its gradient (32: float32).
  """
  per_step = message_bytes(smashed.shape, smashed.dtype, bits)
  model = tree_bytes(client_state)
  n = participants * local_steps
  return Traffic(
      up={"smashed": n * per_step, "labels": n * message_bytes(labels.shape, labels.dtype),
          "client_model": participants * model},
      down={"gradients": n * per_step, "client_model": participants * model})


def fedavg_traffic(model_state: Any, participants: int) -> Traffic:
  """One FedAvg round: the whole model state down to and up from each participant."""
  model = tree_bytes(model_state)
  return Traffic(up={"model": participants * model}, down={"model": participants * model})


def centralized_traffic(images: jax.ShapeDtypeStruct, labels: jax.ShapeDtypeStruct,
                        first_round: bool) -> Traffic:
  """Centralized training: the raw training data, uploaded once (in the first round)."""
  if not first_round:
    return Traffic(up={"data": 0}, down={})
  return Traffic(up={"data": message_bytes(images.shape, images.dtype)
                     + message_bytes(labels.shape, labels.dtype)}, down={})
