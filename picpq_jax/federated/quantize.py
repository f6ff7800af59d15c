"""k-bit quantization of what crosses the cut: smashed data and its gradient.

A message is quantized as one tensor with its own range: ``lo = min(x)``,
``hi = max(x)``, and each value becomes one of ``2**k`` uniform levels in
``[lo, hi]``. On the wire that is ``k`` bits per value plus ``lo`` and ``hi`` as two
float32 numbers (see :func:`picpq_jax.federated.comm.message_bytes`). The rounding is
the library's (:func:`picpq_jax.compress.numerics.uniform_quantize`, half to even,
straight-through gradient), applied to ``(x - lo) / (hi - lo)`` in ``[0, 1]``.

The bit-width is a traced int32 scalar, so changing it never recompiles; ``bits >=
32`` passes the message through unchanged (bit-exact).

When the cut's channel group is pruned, only its kept channels are sent: ``keep``
(the group's 0/1 mask over the last axis) excludes the others from the range and
zeroes them, as a receiver that fills the missing channels with zeros would see.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from picpq_jax.compress.numerics import bypass_full_precision, uniform_quantize

Array = jax.Array


def quantize_message(x: Array, bits: Array, keep: Array | None = None) -> Array:
  """Min-max uniform quantization of a whole tensor to ``2**bits`` levels.

  Forward: ``lo + round((x - lo) / r * (2^k - 1)) / (2^k - 1) * r`` with ``lo =
  min(x)``, ``r = max(x) - min(x)`` (a constant tensor is returned as is). Backward:
  the identity (straight-through; ``lo`` and ``r`` carry no gradient).

  Args:
    x: float array, any shape (one message, e.g. ``[B, h, w, c]``).
    bits: int32 scalar ``k`` (traced); ``>= 32`` returns ``x`` unchanged.
    keep: optional float32 ``[c]`` 0/1 mask of the channels sent (the last axis):
      ``lo`` and ``r`` are taken over them only, and the others become 0 (also at
      ``bits >= 32``). All ones (or ``None``) gives the unmasked result bit for bit.

  Returns:
    Array of ``x``'s shape and dtype.
  """
  if keep is None:
    lo, hi = jnp.min(x), jnp.max(x)
  else:
    sent = keep > 0
    lo = jnp.min(jnp.where(sent, x, jnp.inf))
    hi = jnp.max(jnp.where(sent, x, -jnp.inf))
    lo, hi = jnp.where(jnp.any(sent), lo, 0.0), jnp.where(jnp.any(sent), hi, 0.0)
  lo = jax.lax.stop_gradient(lo).astype(x.dtype)
  span = jax.lax.stop_gradient(hi).astype(x.dtype) - lo
  safe = jnp.where(span > 0, span, jnp.ones_like(span))
  q = lo + uniform_quantize((x - lo) / safe, jnp.minimum(bits, 30)) * safe
  out = bypass_full_precision(bits, x, q).astype(x.dtype)
  return out if keep is None else out * keep.astype(x.dtype)
