"""Quantized frozen base + LoRA (QLoRA-style, Dettmers et al. 2023).

The frozen base's Dense kernels are stored as integer codes plus float32 scales and
dequantized on the fly in the forward pass; LoRA adapters (float32) train on top:

    W' = dequantize(codes, scale) + (alpha / r) * A @ B

Quantizer: block-wise absmax per block of ``block_size`` consecutive input rows of
each output column (``block_size=None`` is one block per output channel), on one of
two grids (``grid``):

* ``"int"`` (uniform, 4 or 8 bits): with ``q = 2^(b-1) - 1`` (127 for 8 bits, 7 for
  4 bits)

      scale = max_block |W| / q          (1 for an all-zero block)
      codes = clip(round(W / scale), -q, q)      dequantized W = codes * scale

  so ``|W - codes * scale| <= scale / 2`` element-wise.
* ``"nf4"`` (4 bits): QLoRA's NormalFloat levels ``NF4`` (Dettmers et al. 2023,
  Sec. 3 "4-bit NormalFloat", Eq. 4 and App. E; :func:`normal_float_levels`): 16
  values in ``[-1, 1]``, quantiles of N(0, 1) with an exact zero, asymmetric (8
  positive, 7 negative), so that weights drawn from a normal distribution fill the
  levels equally:

      scale = max_block |W|              (1 for an all-zero block)
      codes = argmin_i |W / scale - NF4_i|       dequantized W = NF4[codes] * scale

Double quantization (``double_quant=True``, QLoRA Sec. 3 "Double Quantization"):
the block scales ``c`` (one float32 per block) are themselves quantized: their mean
``m`` is subtracted and ``c - m`` is absmax-quantized to int8 in blocks of 256
consecutive scales (row-major over ``[in' / block, out]``), each with a float32
second-level scale. That stores a scale in ``8 + 32/256`` bits instead of 32 (0.127
instead of 0.5 bits per weight at ``block_size=64``). QLoRA's second level is an
8-bit float; here it is the uniform int8 grid. The rounding and ``q`` are the
library's (:func:`picpq_jax.compress.numerics.round_ste` and ``max_level``). The
library's weight quantizers (DoReFa, LSQ, PACT) are not used: DoReFa maps
``tanh(W)`` onto ``[-1, 1]`` (a different weight, meant to be trained, not a
reconstruction of a pretrained one) and LSQ/PACT need learned step sizes; a frozen
base must be reconstructed as closely as its bits allow, which absmax does.

Storage (really smaller in memory, counted exactly by
:func:`picpq_jax.federated.comm.tree_bytes`):

* 8 bits: ``codes`` int8 ``[in', out]``, one byte per weight;
* 4 bits: two codes per byte, ``codes`` uint8 ``[in' / 2, out]``, row ``2i`` in the
  low nibble and row ``2i + 1`` in the high nibble, each stored offset-binary
  (``code + 8``) on the uniform grid, as the level index ``0..15`` on NF4;
* ``scale`` float32 ``[in' / block, out]``; with double quantization int8 of that
  shape, plus ``scale_scale`` float32 ``[ceil(in' / block * out / 256)]`` and
  ``scale_offset`` float32 ``[]``.

``in'`` is ``in`` rounded up to a multiple of the block (and of 2 for 4 bits) with
zero rows, cut off again when dequantizing. A float32 kernel therefore takes
``4 / (b / 8 + 4 / block)`` times more bytes than its quantized form: 3.76x at 8
bits and 7.11x at 4 bits for ``block_size=64``.

Memory in the backward pass: the dequantized kernel is a value the matmul's
gradient needs, so by default a float32 copy of every kernel may stay alive between
the forward and the backward pass. :func:`dequantize` names it
``"picpq_dequantized"`` (``jax.ad_checkpoint.checkpoint_name``), and
``make_train_step(..., remat=RECOMPUTE_DEQUANTIZED)`` asks for it to be recomputed
instead. Measured on XLA:CPU (jax 0.10.2, MiniLM-sized classifier, batch 16 x 64
tokens, ``experiments/finetune/method_memory.py``): the quantized base shrinks the
arguments from 86.9 to 52.1 MiB (4 bits), but the step's temporaries grow from 265.7
(LoRA) to 298.9 MiB, and the policy does not lower them (300.4 MiB): there the
saving of the frozen base is spent on dequantized copies. Accelerators may schedule
it differently; measure there.
"""

from __future__ import annotations

import functools
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from picpq_jax.compress.numerics import max_level, round_ste
from picpq_jax.errors import UserError
from picpq_jax.finetune import lora
from picpq_jax.finetune.peft import Method, Params, flatten, matching, unflatten

Array = jax.Array
BITS = (4, 8)
GRIDS = ("int", "nf4")
SCALE_BLOCK = 256  # scales per second-level block (double quantization)
NF4_OFFSET = 0.9677083  # QLoRA's outermost quantile, 0.5 * (1 - 1/30 + 1 - 1/32)
DEQUANTIZED = "picpq_dequantized"
RECOMPUTE_DEQUANTIZED = jax.checkpoint_policies.save_anything_except_these_names(DEQUANTIZED)


def normal_float_levels(offset: float = NF4_OFFSET) -> np.ndarray:
  """The 16 NormalFloat-4 levels of QLoRA (Dettmers et al. 2023, Eq. 4, App. E).

  ``q_i`` are quantiles of N(0, 1), normalized to ``[-1, 1]``: 8 positive levels
  ``Phi^{-1}(p)`` for ``p`` in ``linspace(offset, 0.5, 9)[:-1]``, 7 negative ones
  ``-Phi^{-1}(p)`` for ``p`` in ``linspace(offset, 0.5, 8)[:-1]``, and 0, sorted and
  divided by the largest (as bitsandbytes' ``create_normal_map``).

  Returns:
    float64 ``[16]``, ascending, ``-1`` first, ``0`` at index 7, ``1`` last.
  """
  inv = statistics.NormalDist().inv_cdf
  pos = [inv(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  neg = [-inv(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  levels = np.sort(np.array(pos + [0.0] + neg))
  return levels / levels.max()


NF4 = normal_float_levels()


@struct.dataclass
class QuantizedTensor:
  """A 2-D weight as codes and per-block scales (see module docs)."""

  codes: Array  # int8 [in', out] (8 bits) or uint8 [in' / 2, out] (4 bits, packed)
  scale: Array  # float32 [in' / block, out]; int8 with double quantization
  bits: int = struct.field(pytree_node=False)
  shape: tuple[int, int] = struct.field(pytree_node=False)  # the original [in, out]
  dtype: Any = struct.field(pytree_node=False)  # the original dtype
  grid: str = struct.field(pytree_node=False, default="int")  # "int" or "nf4"
  scale_scale: Array | None = None  # float32 [ceil(scales / 256)] (double quantization)
  scale_offset: Array | None = None  # float32 [], the scales' mean (double quantization)

  @property
  def ndim(self) -> int:
    return 2


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _absmax_codes(w: Array, bits: int, block: int, grid: str) -> tuple[Array, Array]:
  rows, cols = w.shape
  padded = _round_up(rows, block)
  x = jnp.pad(w.astype(jnp.float32), ((0, padded - rows), (0, 0)))
  blocks = x.reshape(padded // block, block, cols)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  if grid == "nf4":  # nearest level: count the midpoints below
    scale = jnp.where(absmax > 0, absmax, jnp.ones_like(absmax))
    mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2, jnp.float32)
    u = jnp.searchsorted(mids, blocks / scale[:, None]).astype(jnp.uint8).reshape(padded, cols)
    return u[0::2] | (u[1::2] << 4), scale
  q = max_level(jnp.int32(bits - 1))  # 2^(b-1) - 1
  scale = jnp.where(absmax > 0, absmax / q, jnp.ones_like(absmax))
  codes = jnp.clip(round_ste(blocks / scale[:, None]), -q, q).astype(jnp.int8)
  codes = codes.reshape(padded, cols)
  if bits == 4:
    u = (codes + 8).astype(jnp.uint8)
    codes = u[0::2] | (u[1::2] << 4)
  return codes, scale


@jax.jit
def _double_quantize(scale: Array) -> tuple[Array, Array, Array]:
  """``scale`` float32 ``[n, out]`` -> (int8 codes ``[n, out]``, float32 second-level
  scales ``[ceil(n * out / 256)]``, float32 mean): ``c - m`` absmax-quantized to int8
  in blocks of 256 consecutive (row-major) scales."""
  offset = jnp.mean(scale)
  flat = (scale - offset).reshape(-1)
  size = flat.shape[0]
  blocks = jnp.pad(flat, (0, _round_up(size, SCALE_BLOCK) - size)).reshape(-1, SCALE_BLOCK)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  second = jnp.where(absmax > 0, absmax / 127.0, jnp.ones_like(absmax))
  codes = jnp.clip(jnp.round(blocks / second[:, None]), -127, 127).astype(jnp.int8)
  return codes.reshape(-1)[:size].reshape(scale.shape), second, offset


def block_scales(q: QuantizedTensor) -> Array:
  """The per-block scales float32 ``[in' / block, out]`` (double quantization undone)."""
  if q.scale_scale is None:
    return q.scale
  flat = q.scale.reshape(-1).astype(jnp.float32)
  size = flat.shape[0]
  blocks = jnp.pad(flat, (0, _round_up(size, SCALE_BLOCK) - size)).reshape(-1, SCALE_BLOCK)
  scales = (blocks * q.scale_scale[:, None]).reshape(-1)[:size]
  return scales.reshape(q.scale.shape) + q.scale_offset


def quantize(w: Array, bits: int = 4, block_size: int | None = 64, grid: str = "int",
             double_quant: bool = False) -> QuantizedTensor:
  """Block-wise absmax quantization of a kernel ``w`` ``[in, out]``.

  Args:
    w: float 2-D array.
    bits: 4 or 8 (``nf4``: 4).
    block_size: input rows per scale; ``None`` = all rows (per output channel). At
      4 bits an odd block is doubled, so that a block fills whole bytes.
    grid: ``"int"`` (uniform) or ``"nf4"`` (NormalFloat levels).
    double_quant: quantize the block scales to int8 too (blocks of 256).

  Returns:
    :class:`QuantizedTensor`.
  """
  if bits not in BITS:
    raise UserError(f"quantized base bits {bits} is not supported: use 4 or 8")
  if grid not in GRIDS:
    raise UserError(f"quantization grid {grid!r} is unknown: use one of {', '.join(GRIDS)}")
  if grid == "nf4" and bits != 4:
    raise UserError(f"the nf4 grid has 4 bits, got bits={bits}")
  if w.ndim != 2:
    raise UserError(f"can only quantize 2-D kernels, got shape {tuple(w.shape)}")
  rows, cols = w.shape
  block = rows if block_size is None else block_size
  if block < 1:
    raise UserError(f"block size {block_size} must be at least 1 (or None)")
  if bits == 4 and block % 2:
    block *= 2  # a block then always covers whole bytes
  codes, scale = _absmax_codes(jnp.asarray(w), bits, block, grid)
  extra = {}
  if double_quant:
    scale, extra["scale_scale"], extra["scale_offset"] = _double_quantize(scale)
  return QuantizedTensor(codes, scale, bits, (rows, cols), jnp.dtype(w.dtype), grid, **extra)


def dequantize(q: QuantizedTensor) -> Array:
  """``codes * scale`` (``NF4[codes] * scale`` on the nf4 grid) as float32 ``[in,
  out]`` (named for rematerialization)."""
  codes = q.codes
  if q.bits == 4:
    codes = jnp.stack([codes & 0xF, codes >> 4], axis=1).reshape(-1, codes.shape[1])
    codes = (jnp.asarray(NF4, jnp.float32)[codes] if q.grid == "nf4"
             else codes.astype(jnp.int8) - 8)
  scale = block_scales(q)
  blocks = scale.shape[0]
  w = codes.reshape(blocks, -1, codes.shape[1]).astype(jnp.float32) * scale[:, None]
  return checkpoint_name(w.reshape(-1, codes.shape[1])[: q.shape[0]], DEQUANTIZED)


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedTensor)


def quantize_params(params: Params, pattern: str = r"kernel$", bits: int = 4,
                    block_size: int | None = 64, grid: str = "int",
                    double_quant: bool = False) -> Params:
  """``params`` with every 2-D leaf whose path matches ``pattern`` quantized.

  The default pattern takes every Dense kernel; embedding tables (``embedding``)
  and biases stay float unless the pattern names them.

  Raises:
    UserError: ``pattern`` matches no 2-D leaf (the message lists them), bad bits.
  """
  paths = set(matching(params, pattern, "quantize",
                       lambda p, leaf: getattr(leaf, "ndim", 0) == 2))
  return unflatten({p: quantize(v, bits, block_size, grid, double_quant) if p in paths else v
                    for p, v in flatten(params).items()})


def dequantize_params(params: Params) -> Params:
  """Every :class:`QuantizedTensor` leaf of ``params`` dequantized (float32)."""
  return unflatten({p: dequantize(v) if is_quantized(v) else v
                    for p, v in flatten(params).items()})


def method(targets: str = "query|value", rank: int = 8, alpha: float = 16.0, bits: int = 4,
           block_size: int | None = 64, quantize_pattern: str = r"kernel$",
           dropout: float = 0.0, grid: str = "int", double_quant: bool = False) -> Method:
  """QLoRA as a :class:`~picpq_jax.finetune.peft.Method`: ``frozen`` is the base with
  the kernels matching ``quantize_pattern`` quantized to ``bits``; ``trainable`` the
  LoRA adapters of ``targets``. ``combine`` dequantizes and applies the adapters.
  ``grid="nf4", double_quant=True`` is QLoRA's storage (NF4 + double quantization).
  Compose with :func:`~picpq_jax.finetune.peft.train_also` for a float head."""
  if bits not in BITS:
    raise UserError(f"quantized base bits {bits} is not supported: use 4 or 8")
  if grid not in GRIDS or (grid == "nf4" and bits != 4):
    raise UserError(f"quantization grid {grid!r} with {bits} bits is not supported: use "
                    "int (4 or 8 bits) or nf4 (4 bits)")

  def init(key, params):
    adapters = lora.init(key, params, targets, rank)
    return (quantize_params(params, quantize_pattern, bits, block_size, grid, double_quant),
            adapters)

  def combine(frozen, adapters, key=None):
    return lora.apply(dequantize_params(frozen), adapters, alpha, dropout=dropout, key=key), {}

  return Method("qlora", init, combine)

