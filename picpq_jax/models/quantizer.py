"""The quantizer interface that every quantized layer calls.

A quantizer is a small, frozen (hashable, hence static under ``jit``) object that
says how a layer turns its float weights and input activations into quantized
ones. The bit-widths are *not* part of it: they are traced integer arrays read
from the model's ``quant`` collection at run time, so changing them never
recompiles. Learnable quantizer parameters (an LSQ step, a PACT clip) are declared
by ``param_inits`` and live in the layer's ``params``.

``FullPrecision`` is the identity; the compression package adds DoReFa, LSQ and
PACT behind the same three methods.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

import jax

Array = jax.Array
Init = Callable[[jax.Array, tuple[int, ...]], Array]

# A layer keeps full precision when its bit-width is at least this.
FULL_PRECISION_BITS = 32


class Quantizer(Protocol):
  """How a layer quantizes its weights and input activations.

  Implementations must be hashable (frozen dataclasses), because layers hold them
  as static fields.
  """

  def param_inits(self, kernel_shape: tuple[int, ...]) -> Mapping[str, tuple[Init, tuple[int, ...]]]:
    """Learnable quantizer parameters: ``{name: (init_fn, shape)}``."""

  def weights(self, w: Array, bits: Array, qparams: Mapping[str, Array]) -> Array:
    """Quantized weights, same shape and dtype as ``w``; ``bits`` is an int32 scalar."""

  def activations(self, x: Array, bits: Array, qparams: Mapping[str, Array]) -> Array:
    """Quantized input activations, same shape and dtype as ``x``."""


@dataclasses.dataclass(frozen=True)
class FullPrecision:
  """The identity quantizer: weights and activations pass through unchanged."""

  def param_inits(self, kernel_shape: tuple[int, ...]) -> Mapping[str, Any]:
    del kernel_shape
    return {}

  def weights(self, w: Array, bits: Array, qparams: Mapping[str, Array]) -> Array:
    del bits, qparams
    return w

  def activations(self, x: Array, bits: Array, qparams: Mapping[str, Array]) -> Array:
    del bits, qparams
    return x
