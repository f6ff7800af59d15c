"""The physics-inspired criterion (DESIGN.md sections 2 and 4) and its genes.

Hooke's law per layer: the importance of filter ``i`` of prunable layer ``l`` is
``I_li = a_l * FP_li + b_l``; ``a_l > 0`` is the deformation scale, ``b_l`` the shift
that makes importances of different layers comparable. The genes are two float32
vectors ``a, b`` of shape ``[L]`` over the prunable layers (``out_group`` not None)
in structure order, :func:`prunable_layers`, so a population is a pair of
``[P, L]`` arrays and :func:`pic_importance` vmaps over it.

A channel group's importance is the **sum over all its writers** of their filter
importances: the layers coupled by a residual addition (DESIGN.md section 2), and
also a depthwise conv that reads and writes the group (MobileNetV2), because its
filter ``i`` is removed with channel ``i`` exactly like the producer's filter ``i``.

The evolution's gene operators (section 4) are pure functions of a PRNG key:
:func:`init_genes`, :func:`mutate` and :func:`mutation_step`.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import chex
import jax
import jax.numpy as jnp

from picpq_jax.errors import UserError
from picpq_jax.models.structure import ModelStructure

Array = jax.Array


class Genes(NamedTuple):
  """The learnable parameters of the criterion; a pytree (stack them for a population)."""

  a: Array  # float32 [L]: deformation scale per prunable layer, > 0
  b: Array  # float32 [L]: shift per prunable layer


def prunable_layers(structure: ModelStructure) -> tuple[str, ...]:
  """Names of the layers that write a channel group, in structure (call) order."""
  return tuple(l.name for l in structure.layers if l.out_group is not None)


def _check_fp(fp: Mapping[str, Array], structure: ModelStructure) -> None:
  for info in structure.layers:
    if info.out_group is None:
      continue
    if info.name not in fp:
      raise UserError(f"filter property has no entry for prunable layer {info.name!r}: "
                      f"compute it with criteria.filter_property on this model")
    chex.assert_shape(fp[info.name], (info.out_features,))


def fp_std(fp: Mapping[str, Array], structure: ModelStructure) -> Array:
  """Standard deviation (``ddof=0``) of each prunable layer's FP: float32 ``[L]``.

  It scales the shift genes: ``b ~ N(0, std(FP_l))`` (DESIGN.md section 4).
  """
  _check_fp(fp, structure)
  return jnp.stack([jnp.std(jnp.asarray(fp[name], jnp.float32))
                    for name in prunable_layers(structure)])


def pic_importance(fp: Mapping[str, Array], a: Array, b: Array,
                   structure: ModelStructure) -> dict[str, Array]:
  """Channel importances of every group: ``I_g = sum_{l in writers(g)} a_l * FP_l + b_l``.

  Args:
    fp: ``{layer: float32 [C_out]}`` filter property of every prunable layer.
    a, b: float32 ``[L]`` genes over :func:`prunable_layers`.
    structure: the model's structure (static).

  Returns:
    ``{group_name: float32 [C_group]}``, one entry per channel group; higher means
    keep. Jittable, and vmappable over ``(a, b)`` with ``fp`` fixed.
  """
  names = prunable_layers(structure)
  chex.assert_shape([a, b], (len(names),))
  _check_fp(fp, structure)
  index = {name: i for i, name in enumerate(names)}
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  out = {}
  for group in structure.groups:
    terms = [a[index[w]] * jnp.asarray(fp[w], jnp.float32) + b[index[w]]
             for w in group.writers]
    out[group.name] = sum(terms[1:], terms[0])
  return out


def init_genes(key: Array, fp: Mapping[str, Array], structure: ModelStructure) -> Genes:
  """Random initial genes: ``a = exp(N(0, 1))``, ``b = N(0, std(FP_l))`` (section 4).

  Returns:
    :class:`Genes` with float32 ``[L]`` fields. ``vmap`` over keys for a population.
  """
  std = fp_std(fp, structure)
  key_a, key_b = jax.random.split(key)
  a = jnp.exp(jax.random.normal(key_a, std.shape, jnp.float32))
  b = jax.random.normal(key_b, std.shape, jnp.float32) * std
  return Genes(a, b)


def num_mutated_layers(num_layers: int, rate: float) -> int:
  """Layers a child mutates: ``floor(rate * L)``, at least 1 (reference: 10%)."""
  if not 0.0 < rate <= 1.0:
    raise UserError(f"mutation rate {rate} is out of range: use 0 < rate <= 1")
  return max(1, math.floor(rate * num_layers + 1e-9))


def mutate(key: Array, a: Array, b: Array, fp_std: Array, step: Array | float,
           rate: float = 0.1, replace: bool = False) -> Genes:
  """A child of genes ``(a, b)``: mutate :func:`num_mutated_layers` random layers.

  For each chosen layer ``l``: ``a_l *= exp(N(0, step))`` (stays positive) and
  ``b_l += N(0, fp_std_l)``; the other layers are copied (DESIGN.md section 4).
  ``replace=True`` draws the layers with replacement, as the reference
  (``random.randint`` per mutation): a layer drawn ``k`` times is mutated ``k``
  times, i.e. its noise has ``sqrt(k)`` times the standard deviation.

  Args:
    key: PRNG key; it chooses the layers and draws the noise.
    a, b: float32 ``[L]`` parent genes.
    fp_std: float32 ``[L]`` from :func:`fp_std`.
    step: mutation step (scalar, may be traced), see :func:`mutation_step`.
    rate: fraction of layers to mutate (static Python float).
    replace: draw the layers with replacement (static).

  Returns:
    :class:`Genes`; jittable with ``rate`` static, vmappable over keys and parents.
  """
  num_layers = a.shape[-1]
  chex.assert_shape([a, b, fp_std], (num_layers,))
  count = num_mutated_layers(num_layers, rate)
  key_layers, key_a, key_b = jax.random.split(key, 3)
  if replace:
    chosen = jax.random.randint(key_layers, (count,), 0, num_layers)
  else:  # the ``count`` largest of L uniform draws: a uniformly random subset
    _, chosen = jax.lax.top_k(jax.random.uniform(key_layers, (num_layers,)), count)
  times = jnp.zeros((num_layers,), jnp.float32).at[chosen].add(1.0)
  scale = jnp.sqrt(times)  # k independent normal steps sum to one of sqrt(k) times the std
  noise_a = jax.random.normal(key_a, (num_layers,), jnp.float32) * step * scale
  noise_b = jax.random.normal(key_b, (num_layers,), jnp.float32) * fp_std * scale
  return Genes(a * jnp.exp(noise_a), b + noise_b)


def mutation_step(gen: int | Array, generations: int) -> float | Array:
  """Mutation step of generation ``gen``: ``1 - gen / (1.25 * generations)``.

  Decays linearly from 1 at ``gen = 0`` to 0.2 at ``gen = generations``.
  """
  if generations <= 0:
    raise UserError(f"generations={generations} is out of range: use a positive integer")
  return 1.0 - gen / (1.25 * generations)
