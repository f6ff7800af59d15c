"""Bytes per round per UE, and a model of a round's wall time with and without the
BTS pipeline.

Traffic (per UE and round of ``E`` local steps of batch ``B``; codeword ``M =
2048 / CR`` values), counted with :func:`picpq_jax.federated.comm.message_bytes`
(raw ``size * itemsize``, or ``ceil(size * k / 8) + 8`` bytes for a message
quantized to ``k`` bits with its float32 range):

* **split** / **pipeline**: each step, up the codewords ``[B, M]`` (at ``bits``) and
  the CSI they encode ``[B, 32, 32, 2]`` (the training targets, at ``target_bits``);
  down the codewords' gradient ``[B, M]`` (float32). In a round that averages the
  encoders (``encoder_sync``), the encoder's ``params`` and ``batch_stats`` once
  up and once down.
* **fedavg**: the whole autoencoder's ``params`` and ``batch_stats`` down and up.
* **centralized**: the UE's training set ``[n, 32, 32, 2]`` (at ``target_bits``)
  up once, in round 1.

Round time (:func:`round_time`), per local step, the UEs working in parallel, each
on its own link: ``UE forward + uplink + BTS + downlink + UE backward``; the BTS
decodes ``n = U`` micro-batches (one per UE) through ``S`` stages with forward times
``f_s`` and backward times ``b_s`` per micro-batch. Without a pipeline it takes
``n * sum_s (f_s + b_s)``; the GPipe schedule takes ``(n + S - 1) * (max_s f_s +
max_s b_s)``, of which a fraction ``(S - 1) / (n + S - 1)`` is bubble. FedAvg's
round is the model down, ``E`` whole-model steps, the model up.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from picpq_jax.csi.domain import CODE_SIZE
from picpq_jax.federated.comm import Traffic, message_bytes, tree_bytes

FLOAT32 = 32


def _shapes(tree: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def exchanged(variables: dict, side: str | None = None) -> dict:
  """What an averaging exchange sends: ``params`` and ``batch_stats`` (of ``side``,
  ``"encoder"`` or ``"decoder"``, when given), as shapes."""
  pick = (lambda t: t[side]) if side else (lambda t: t)
  return _shapes({col: pick(variables[col]) for col in ("params", "batch_stats")})


def split_traffic(codeword: int, batch_size: int, local_steps: int, bits: int = FLOAT32,
                  target_bits: int = FLOAT32, encoder: Any = None) -> Traffic:
  """One UE's bytes in one round of the split method.

  Args:
    codeword: ``M`` values per sample.
    batch_size, local_steps: ``B`` and ``E``.
    bits, target_bits: bits per codeword value and per target value (32: float32).
    encoder: the encoder state averaged this round (shapes), or ``None``.
  """
  per_step = lambda shape, b: message_bytes(shape, np.float32, b)
  up = {"codewords": local_steps * per_step((batch_size, codeword), bits),
        "targets": local_steps * per_step((batch_size, CODE_SIZE), target_bits)}
  down = {"gradients": local_steps * per_step((batch_size, codeword), FLOAT32)}
  if encoder is not None:
    up["encoder"] = down["encoder"] = tree_bytes(encoder)
  return Traffic(up=up, down=down)


def fedavg_traffic(model: Any) -> Traffic:
  """One UE's bytes in one FedAvg round: the whole model down and up."""
  return Traffic(up={"model": tree_bytes(model)}, down={"model": tree_bytes(model)})


def centralized_traffic(samples: int, target_bits: int = FLOAT32, first_round: bool = True) -> Traffic:
  """One UE's bytes: its ``samples`` training CSI matrices, uploaded in round 1."""
  data = message_bytes((samples, CODE_SIZE), np.float32, target_bits) if first_round else 0
  return Traffic(up={"data": data}, down={})


@dataclasses.dataclass(frozen=True)
class Timing:
  """Measured or assumed compute times, seconds per local step / micro-batch.

  ``ue_forward`` and ``ue_backward``: a UE's encoder on its batch; ``ue_step``: a
  UE's whole-autoencoder step (FedAvg); ``stage_forward[s]`` and
  ``stage_backward[s]``: decoder stage ``s`` on one micro-batch (one UE's batch).
  """

  ue_forward: float
  ue_backward: float
  ue_step: float
  stage_forward: tuple[float, ...]
  stage_backward: tuple[float, ...]


def bts_time(stage_forward: Sequence[float], stage_backward: Sequence[float],
             micro_batches: int, pipelined: bool) -> float:
  """Seconds for the BTS to decode and back-propagate ``micro_batches`` micro-batches."""
  n, s = micro_batches, len(stage_forward)
  if not pipelined:
    return n * (sum(stage_forward) + sum(stage_backward))
  return (n + s - 1) * (max(stage_forward) + max(stage_backward))


def round_time(method: str, timing: Timing, traffic: Traffic, num_ues: int, local_steps: int,
               uplink_bps: float, downlink_bps: float) -> dict[str, float]:
  """The modelled wall time of one round, and its parts (seconds).

  ``traffic`` is one UE's bytes of the round; the UEs' links run in parallel.
  Returns ``{"total", "ue", "link", "bts", "bubble"}``; ``bubble`` is the part of
  ``bts`` in which each stage idles (``(S - 1) / (n + S - 1)`` of it). Centralized:
  the server runs ``U`` UEs' worth of whole-model steps (``ue_step`` each) per step.
  """
  up = traffic.up_bytes * 8 / uplink_bps
  down = traffic.down_bytes * 8 / downlink_bps
  if method == "fedavg":
    ue = local_steps * timing.ue_step
    return {"total": ue + up + down, "ue": ue, "link": up + down, "bts": 0.0, "bubble": 0.0}
  if method == "centralized":
    bts = local_steps * timing.ue_step * num_ues
    return {"total": bts + up + down, "ue": 0.0, "link": up + down, "bts": bts, "bubble": 0.0}
  pipelined = method == "pipeline"
  stages = len(timing.stage_forward)
  bts = local_steps * bts_time(timing.stage_forward, timing.stage_backward, num_ues, pipelined)
  bubble = bts * (stages - 1) / (num_ues + stages - 1) if pipelined else 0.0
  ue = local_steps * (timing.ue_forward + timing.ue_backward)
  return {"total": ue + up + down + bts, "ue": ue, "link": up + down, "bts": bts,
          "bubble": bubble}
