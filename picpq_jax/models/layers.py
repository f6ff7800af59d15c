"""Masked, quantized layers shared by every model.

Every conv and dense layer of the library is a :class:`QConv` or :class:`QDense`.
Besides its ``params`` (``kernel``, optional ``bias`` and any learnable quantizer
parameters) it owns two int32 scalars in the ``quant`` collection, ``w_bits`` and
``a_bits``, read at run time. Each layer also *declares* which channel group it
reads (``in_group``) and which it writes (``out_group``); those strings are static
and form the model's pruning graph (see :mod:`picpq_jax.models.structure`).

Channel masks are applied by the model where a group is written: after the
normalization and activation that follow a conv (a BN shift would otherwise revive
a pruned channel) and after a residual addition. :func:`channel_mask` creates the
model-level ``masks`` entry of a group.

Every model is a sequence of *pieces* (stem, stages or conv groups, head; its
``pieces()`` names them) and takes an optional, static ``span`` field
(:data:`Span`): ``(start, stop)`` runs only pieces ``start <= i < stop``, taking the
output of piece ``start - 1`` as input, and creates only their variables (masks
excepted: see each model). Split learning (:mod:`picpq_jax.federated.split`) cuts a
model into ``span=(0, b)`` and ``span=(b, len(pieces))``; ``None`` runs them all.
:func:`in_span` is the test each model applies.

Every model takes an optional, static ``group_sizes`` field (:data:`GroupSizes`):
``((group, channels), ...)`` overrides the width of the named groups, so that
:func:`picpq_jax.compress.compact` can build the smaller dense model that keeps
only the unpruned channels. :func:`group_width` reads it and
:func:`check_group_sizes` rejects names the model does not have.
"""

from __future__ import annotations

from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from picpq_jax.errors import UserError
from picpq_jax.models import conv_algorithms
from picpq_jax.models.quantizer import FULL_PRECISION_BITS, FullPrecision, Quantizer

Array = jax.Array

# PyTorch's defaults for BatchNorm2d (momentum 0.1 there is 0.9 here).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# Static per-group widths of a compacted model: ((group name, channels), ...).
GroupSizes = tuple[tuple[str, int], ...] | None

# Static range of a model's pieces to run: (start, stop); None runs the whole model.
Span = tuple[int, int] | None

# He-normal on fan-out, as torchvision initializes conv kernels.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Output maps of at most this many pixels are convolved as one matmul over shifted
# taps (:func:`conv2d`): XLA:CPU's convolution is pathologically slow on them, e.g. a
# 3x3, 512 -> 512 conv on 128 maps of 2x2 took 2.1 s forward and 3.6 s with gradients
# against 19 and 50 ms as a matmul (experiments/bench/RESULTS.md, VGG-16's last block).
TINY_MAP_PIXELS = 4


def conv_taps_matmul(x: Array, kernel: Array, padding: Any,
                     preferred_element_type: Any = None) -> Array:
  """Stride-1 dense convolution as one matmul over the kernel's shifted taps.

  Args:
    x: ``[N, H, W, C_in]``.
    kernel: ``[kh, kw, C_in, C_out]`` (HWIO).
    padding: ``((top, bottom), (left, right))``.

  Returns:
    ``[N, H', W', C_out]`` with ``H' = H + top + bottom - kh + 1`` (likewise ``W'``),
    equal to ``lax.conv_general_dilated`` with the same padding. The input is
    gathered into ``[N, H', W', kh * kw * C_in]`` (tap-major, as the kernel's HWIO
    layout flattens), so memory grows ``kh * kw`` times: meant for tiny maps.
    ``preferred_element_type``: the accumulation and result dtype, as in
    ``lax.dot_general`` (``None``: the operands').
  """
  kh, kw, c_in, c_out = kernel.shape
  (top, bottom), (left, right) = padding
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  h_out, w_out = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  taps = jnp.concatenate([xp[:, i:i + h_out, j:j + w_out, :]
                          for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.dot(taps, kernel.reshape(kh * kw * c_in, c_out),
                 preferred_element_type=preferred_element_type)


def accumulation_dtype(dtype: Any) -> Any:
  """The dtype a conv or dense product of ``dtype`` operands accumulates and returns
  in: float32 for bfloat16 and float32 operands, float64 for float64 ones (a float64
  model, under ``jax.enable_x64``, is the reference the tests compare gradients to)."""
  return jnp.promote_types(dtype, jnp.float32)


def conv2d(x: Array, kernel: Array, strides: tuple[int, int], padding: Any,
           feature_group_count: int = 1, preferred_element_type: Any = None) -> Array:
  """NHWC/HWIO convolution ``[N, H, W, C_in] -> [N, H', W', C_out]``.

  ``lax.conv_general_dilated``, except for dense stride-1 convolutions with
  explicit padding: one whose output has at most :data:`TINY_MAP_PIXELS` pixels
  runs as :func:`conv_taps_matmul` (same result to float rounding, much faster on
  XLA:CPU), and one whose shape has a tuned algorithm installed
  (:mod:`picpq_jax.models.conv_algorithms`) runs with that one.
  ``preferred_element_type``: the accumulation and result dtype (``None``: the
  operands'); bfloat16 operands with ``jnp.float32`` accumulate in float32.
  """
  explicit = not isinstance(padding, str)
  if explicit and tuple(strides) == (1, 1) and feature_group_count == 1:
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    h_out = x.shape[1] + sum(padding[0]) - kernel.shape[0] + 1
    w_out = x.shape[2] + sum(padding[1]) - kernel.shape[1] + 1
    if h_out * w_out <= TINY_MAP_PIXELS:
      return conv_taps_matmul(x, kernel, padding, preferred_element_type)
    algorithm = conv_algorithms.choice(
        conv_algorithms.shape_key(x.shape, kernel.shape, padding, x.dtype))
    if algorithm == "input_taps":
      return conv_taps_matmul(x, kernel, padding, preferred_element_type)
    if algorithm == "output_taps":
      return conv_algorithms.conv_output_taps(x, kernel, padding, preferred_element_type)
  return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=feature_group_count,
                                  preferred_element_type=preferred_element_type)


def _quantize_operands(module: nn.Module, x: Array, kernel: Array) -> tuple[Array, Array]:
  """Quantizes a layer's input and kernel with its quantizer and ``quant`` bit-widths.

  Creates the layer's ``quant/{w_bits,a_bits}`` (int32 scalars) and any learnable
  quantizer parameters in ``params``.
  """
  quantizer, default = module.quantizer, module.default_bits
  bits = {name: module.variable("quant", name, lambda: jnp.asarray(default, jnp.int32)).value
          for name in ("w_bits", "a_bits")}
  qparams = {name: module.param(name, init, shape)
             for name, (init, shape) in quantizer.param_inits(tuple(kernel.shape)).items()}
  return (quantizer.activations(x, bits["a_bits"], qparams),
          quantizer.weights(kernel, bits["w_bits"], qparams))


class QConv(nn.Module):
  """2-D convolution, NHWC, with quantized weights and input activations.

  Input ``[N, H, W, C_in]`` -> output ``[N, H', W', features]``. Padding defaults to
  ``kernel // 2`` on every side (PyTorch's convention for odd kernels), so stride-2
  convs see the same windows as the reference models.

  Attributes:
    features: output channels.
    kernel_size: ``(kh, kw)``.
    strides: ``(sh, sw)``.
    padding: ``None`` for ``kernel // 2``, else anything ``lax.conv_general_dilated``
      accepts.
    feature_group_count: 1 for a dense conv, ``C_in`` for a depthwise one.
    use_bias: add a learned bias.
    in_group, out_group: the channel groups this conv reads and writes (static
      declarations; ``None`` for the image input or an unprunable output).
    quantizer: static quantizer; bit-widths come from the ``quant`` collection.
    default_bits: initial ``w_bits`` and ``a_bits``.
    dtype: dtype of the (quantized) operands of the product, e.g. ``"bfloat16"`` for
      mixed precision; it accumulates and returns float32, and the kernel is stored
      float32.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: Any = None
  feature_group_count: int = 1
  use_bias: bool = False
  in_group: str | None = None
  out_group: str | None = None
  quantizer: Quantizer = FullPrecision()
  default_bits: int = FULL_PRECISION_BITS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_features = x.shape[-1]
    if in_features % self.feature_group_count:
      raise ValueError(
          f"{self.name}: {in_features} input channels do not split into "
          f"{self.feature_group_count} groups")
    kernel_shape = (*self.kernel_size, in_features // self.feature_group_count, self.features)
    kernel = self.param("kernel", conv_kernel_init, kernel_shape, jnp.float32)
    x, kernel = _quantize_operands(self, x, kernel)
    padding = self.padding
    if padding is None:
      padding = [(k // 2, k // 2) for k in self.kernel_size]
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, padding,
               self.feature_group_count,
               preferred_element_type=accumulation_dtype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return y


class QDense(nn.Module):
  """Dense layer ``[..., C_in] -> [..., features]`` with quantized weights and inputs.

  Attributes mirror :class:`QConv`; the kernel is ``[C_in, features]`` and a bias is
  used by default (PyTorch's ``nn.Linear``).
  """

  features: int
  use_bias: bool = True
  in_group: str | None = None
  out_group: str | None = None
  quantizer: Quantizer = FullPrecision()
  default_bits: int = FULL_PRECISION_BITS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel_shape = (x.shape[-1], self.features)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), kernel_shape, jnp.float32)
    x, kernel = _quantize_operands(self, x, kernel)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype),
                preferred_element_type=accumulation_dtype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return y


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults; batch statistics in training mode."""
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                      epsilon=BN_EPSILON, name=name)


def channel_mask(module: nn.Module, group: str, size: int) -> Array:
  """The ``masks`` entry of channel group ``group``: float32 ``[size]``, init ones.

  Call it on the top-level model module, once per group. Group names share the
  module's namespace with its submodules, so they must differ from them.
  """
  return module.variable("masks", group, lambda: jnp.ones((size,), jnp.float32)).value


def in_span(span: Span, piece: int) -> bool:
  """Whether piece number ``piece`` of a model runs under its ``span`` field."""
  return span is None or span[0] <= piece < span[1]


def group_width(group_sizes: GroupSizes, group: str, default: int) -> int:
  """Channels of ``group``: its entry in ``group_sizes`` if any, else ``default``."""
  return dict(group_sizes or ()).get(group, default)


def check_group_sizes(group_sizes: GroupSizes, groups: Iterable[str]) -> None:
  """Raises ``UserError`` if ``group_sizes`` names an unknown group or a width below 1.

  Args:
    group_sizes: a model's ``group_sizes`` field.
    groups: the names of the model's channel groups (its ``masks`` entries).
  """
  sizes = dict(group_sizes or ())
  unknown = sorted(set(sizes) - set(groups))
  if unknown:
    raise UserError(f"group_sizes names groups {unknown} that the model does not have; "
                    "use names of its masks")
  small = sorted(name for name, size in sizes.items() if size < 1)
  if small:
    raise UserError(f"group_sizes gives groups {small} fewer than 1 channel; keep at least one")
