"""Rounding, clipping and gradient scaling with their backward passes defined once.

Every quantizer of :mod:`picpq_jax.compress.quantizers` is written with these few
functions, so the straight-through estimator (STE) and the tie rules live in one
place (AQT's split of numerics from the quantizers that use them).

* :func:`round_ste` rounds half to even, as ``torch.round`` and ``jnp.round`` do
  (``round(0.5) = 0``, ``round(1.5) = 2``, ``round(-0.5) = -0``); its gradient is the
  identity. Half-to-even is symmetric (``round(-x) = -round(x)``), so a symmetric
  quantizer built on it maps ``w`` and ``-w`` to opposite levels.
* :func:`clip_ste` is ``clip(x, lo, hi)`` with the derivative written out, so the
  tie ``x == lo`` or ``x == hi`` has a stated rule instead of JAX's half-half split
  of ``max``/``min`` ties.
* :func:`scale_grad` is the identity forward and multiplies the gradient by ``g``
  backward (LSQ's step-size gradient scale), bit-exact in the forward pass.
* :func:`uniform_quantize` is DoReFa's ``quantize_k`` on ``[0, 1]``.

Bit-widths are traced int32 scalars: none of these functions recompiles when they
change. :func:`bypass_full_precision` returns its input unchanged where
``bits >= 32`` (a ``jnp.where``, so no ``lax.cond`` predicate is sent to the host).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from picpq_jax.models.quantizer import FULL_PRECISION_BITS

Array = jax.Array


@jax.custom_vjp
def round_ste(x: Array) -> Array:
  """Rounds to the nearest integer, half to even; straight-through gradient.

  Forward: ``jnp.round(x)`` (``torch.round``'s rule). Backward: ``d/dx = 1``.

  Args:
    x: float array, any shape.

  Returns:
    Array of ``x``'s shape and dtype holding integers.
  """
  return jnp.round(x)


def _round_fwd(x: Array) -> tuple[Array, None]:
  return jnp.round(x), None


def _round_bwd(residual: None, g: Array) -> tuple[Array]:
  del residual
  return (g,)


round_ste.defvjp(_round_fwd, _round_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _clip(x: Array, lo: Array, hi: Array, ties_inside: bool) -> Array:
  return jnp.minimum(jnp.maximum(x, lo), hi)


def _clip_fwd(x: Array, lo: Array, hi: Array, ties_inside: bool):
  return jnp.minimum(jnp.maximum(x, lo), hi), (x, lo, hi)


def _clip_bwd(ties_inside: bool, residual, g: Array):
  x, lo, hi = residual
  above = x > hi if ties_inside else x >= hi
  below = x < lo if ties_inside else x <= lo
  inside = jnp.logical_not(above | below)
  zero = jnp.zeros_like(g)
  return (jnp.where(inside, g, zero),
          jnp.sum(jnp.where(below, g, zero)).astype(lo.dtype),
          jnp.sum(jnp.where(above, g, zero)).astype(hi.dtype))


_clip.defvjp(_clip_fwd, _clip_bwd)


def clip_ste(x: Array, lo: Array | float, hi: Array | float, *,
             ties_inside: bool = True) -> Array:
  """``clip(x, lo, hi)`` with an explicit derivative and tie rule.

  Backward with ``ties_inside=True`` (``torch.clamp``'s rule, DoReFa): ``d/dx = 1``
  where ``lo <= x <= hi`` and 0 elsewhere; ``d/dlo = sum(g where x < lo)``;
  ``d/dhi = sum(g where x > hi)``. With ``ties_inside=False`` a value equal to a
  bound counts as clipped: ``d/dx = 1`` only where ``lo < x < hi``,
  ``d/dlo = sum(g where x <= lo)``, ``d/dhi = sum(g where x >= hi)``; that is the
  rule of LSQ (Esser et al. 2020, eqs. 3 and 5) and PACT (``dy/dalpha = 1`` for
  ``x >= alpha``, Choi et al. 2018, eq. 3). Away from ties both are the exact
  derivative of the clip.

  Args:
    x: float array, any shape.
    lo, hi: float scalars (python floats or 0-d arrays), ``lo <= hi``.
    ties_inside: static; whether ``x == lo`` or ``x == hi`` passes its gradient to
      ``x`` (True) or to the bound (False).

  Returns:
    ``min(max(x, lo), hi)``, shape and dtype of ``x``.
  """
  lo = jnp.asarray(lo, x.dtype)
  hi = jnp.asarray(hi, x.dtype)
  if lo.ndim or hi.ndim:
    raise ValueError(f"clip_ste bounds must be scalars, got shapes {lo.shape} and {hi.shape}")
  return _clip(x, lo, hi, ties_inside)


@jax.custom_vjp
def scale_grad(x: Array, g: Array) -> Array:
  """Identity forward; backward multiplies the cotangent of ``x`` by ``g``.

  LSQ (Esser et al. 2020, section 2.2) scales the step-size gradient by
  ``g = 1 / sqrt(N * Q_P)``. ``g`` receives no gradient.

  Args:
    x: float array.
    g: float scalar (may be traced).

  Returns:
    ``x`` itself.
  """
  del g
  return x


def _scale_fwd(x: Array, g: Array) -> tuple[Array, Array]:
  return x, g


def _scale_bwd(g: Array, cotangent: Array) -> tuple[Array, Array]:
  return (cotangent * g).astype(cotangent.dtype), jnp.zeros_like(g)


scale_grad.defvjp(_scale_fwd, _scale_bwd)


def max_level(bits: Array, dtype=jnp.float32) -> Array:
  """``2**bits - 1`` as a float scalar of ``dtype``, for int32 ``bits`` (traced).

  Bits below 1 count as 1, so the result is at least 1 and never divides by zero.
  """
  chex.assert_rank(bits, 0)
  bits = jnp.maximum(jnp.asarray(bits, jnp.int32), 1)
  return jnp.exp2(bits.astype(dtype)) - 1


def uniform_quantize(x: Array, bits: Array) -> Array:
  """DoReFa's ``quantize_k``: ``round(x * (2^k - 1)) / (2^k - 1)``, STE round.

  Maps ``[0, 1]`` onto the ``2^k`` levels ``{0, 1/(2^k-1), ..., 1}``. The caller
  keeps ``x`` in ``[0, 1]``; values outside are rounded on the same grid.

  Args:
    x: float array, any shape, values in ``[0, 1]``.
    bits: int32 scalar ``k`` (may be traced); ``k < 1`` counts as 1.

  Returns:
    Array of ``x``'s shape and dtype.
  """
  n = max_level(bits, x.dtype)
  return round_ste(x * n) / n


def bypass_full_precision(bits: Array, x: Array, quantized: Array) -> Array:
  """``x`` where ``bits >= 32`` (full precision), else ``quantized``; bit-exact.

  A select, not a branch: both sides are computed, the gradient of the unselected
  side is zero, and a changing ``bits`` never recompiles.
  """
  return jnp.where(jnp.asarray(bits) >= FULL_PRECISION_BITS, x, quantized)
