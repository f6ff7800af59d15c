"""Quantized frozen base + LoRA (QLoRA-style, Dettmers et al. 2023).

The frozen base's Dense kernels are stored as integer codes plus float32 scales and
dequantized on the fly in the forward pass; LoRA adapters (float32) train on top:

    W' = dequantize(codes, scale) + (alpha / r) * A @ B

Quantizer: symmetric absmax integer quantization per block of ``block_size``
consecutive input rows of each output column (QLoRA's block-wise absmax, with a
uniform grid instead of its NF4 levels; ``block_size=None`` is one block per output
channel). With ``q = 2^(b-1) - 1`` (127 for 8 bits, 7 for 4 bits):

    scale = max_block |W| / q          (1 for an all-zero block)
    codes = clip(round(W / scale), -q, q)      dequantized W = codes * scale

so ``|W - codes * scale| <= scale / 2`` element-wise. The rounding and ``q`` are the
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
  (``code + 8``);
* ``scale`` float32 ``[in' / block, out]``.

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
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from picpq_jax.compress.numerics import max_level, round_ste
from picpq_jax.errors import UserError
from picpq_jax.finetune import lora
from picpq_jax.finetune.peft import Method, Params, flatten, matching, unflatten

Array = jax.Array
BITS = (4, 8)
DEQUANTIZED = "picpq_dequantized"
RECOMPUTE_DEQUANTIZED = jax.checkpoint_policies.save_anything_except_these_names(DEQUANTIZED)


@struct.dataclass
class QuantizedTensor:
  """A 2-D weight as integer codes and per-block float32 scales (see module docs)."""

  codes: Array  # int8 [in', out] (8 bits) or uint8 [in' / 2, out] (4 bits, packed)
  scale: Array  # float32 [in' / block, out]
  bits: int = struct.field(pytree_node=False)
  shape: tuple[int, int] = struct.field(pytree_node=False)  # the original [in, out]
  dtype: Any = struct.field(pytree_node=False)  # the original dtype

  @property
  def ndim(self) -> int:
    return 2


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@functools.partial(jax.jit, static_argnums=(1, 2))
def _absmax_codes(w: Array, bits: int, block: int) -> tuple[Array, Array]:
  rows, cols = w.shape
  padded = _round_up(rows, block)
  x = jnp.pad(w.astype(jnp.float32), ((0, padded - rows), (0, 0)))
  blocks = x.reshape(padded // block, block, cols)
  q = max_level(jnp.int32(bits - 1))  # 2^(b-1) - 1
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  scale = jnp.where(absmax > 0, absmax / q, jnp.ones_like(absmax))
  codes = jnp.clip(round_ste(blocks / scale[:, None]), -q, q).astype(jnp.int8)
  codes = codes.reshape(padded, cols)
  if bits == 4:
    u = (codes + 8).astype(jnp.uint8)
    codes = u[0::2] | (u[1::2] << 4)
  return codes, scale


def quantize(w: Array, bits: int = 4, block_size: int | None = 64) -> QuantizedTensor:
  """Block-wise absmax quantization of a kernel ``w`` ``[in, out]``.

  Args:
    w: float 2-D array.
    bits: 4 or 8.
    block_size: input rows per scale; ``None`` = all rows (per output channel). At
      4 bits an odd block is doubled, so that a block fills whole bytes.

  Returns:
    :class:`QuantizedTensor`.
  """
  if bits not in BITS:
    raise UserError(f"quantized base bits {bits} is not supported: use 4 or 8")
  if w.ndim != 2:
    raise UserError(f"can only quantize 2-D kernels, got shape {tuple(w.shape)}")
  rows, cols = w.shape
  block = rows if block_size is None else block_size
  if block < 1:
    raise UserError(f"block size {block_size} must be at least 1 (or None)")
  if bits == 4 and block % 2:
    block *= 2  # a block then always covers whole bytes
  codes, scale = _absmax_codes(jnp.asarray(w), bits, block)
  return QuantizedTensor(codes, scale, bits, (rows, cols), jnp.dtype(w.dtype))


def dequantize(q: QuantizedTensor) -> Array:
  """``codes * scale`` as float32 ``[in, out]`` (named for rematerialization)."""
  codes = q.codes
  if q.bits == 4:
    lo = (codes & 0xF).astype(jnp.int8) - 8
    hi = (codes >> 4).astype(jnp.int8) - 8
    codes = jnp.stack([lo, hi], axis=1).reshape(-1, codes.shape[1])
  blocks = q.scale.shape[0]
  w = codes.reshape(blocks, -1, codes.shape[1]).astype(jnp.float32) * q.scale[:, None]
  return checkpoint_name(w.reshape(-1, codes.shape[1])[: q.shape[0]], DEQUANTIZED)


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedTensor)


def quantize_params(params: Params, pattern: str = r"kernel$", bits: int = 4,
                    block_size: int | None = 64) -> Params:
  """``params`` with every 2-D leaf whose path matches ``pattern`` quantized.

  The default pattern takes every Dense kernel; embedding tables (``embedding``)
  and biases stay float unless the pattern names them.

  Raises:
    UserError: ``pattern`` matches no 2-D leaf (the message lists them), bad bits.
  """
  paths = set(matching(params, pattern, "quantize",
                       lambda p, leaf: getattr(leaf, "ndim", 0) == 2))
  return unflatten({p: quantize(v, bits, block_size) if p in paths else v
                    for p, v in flatten(params).items()})


def dequantize_params(params: Params) -> Params:
  """Every :class:`QuantizedTensor` leaf of ``params`` dequantized (float32)."""
  return unflatten({p: dequantize(v) if is_quantized(v) else v
                    for p, v in flatten(params).items()})


def method(targets: str = "query|value", rank: int = 8, alpha: float = 16.0, bits: int = 4,
           block_size: int | None = 64, quantize_pattern: str = r"kernel$",
           dropout: float = 0.0) -> Method:
  """QLoRA as a :class:`~picpq_jax.finetune.peft.Method`: ``frozen`` is the base with
  the kernels matching ``quantize_pattern`` quantized to ``bits``; ``trainable`` the
  LoRA adapters of ``targets``. ``combine`` dequantizes and applies the adapters.
  Compose with :func:`~picpq_jax.finetune.peft.train_also` for a float head."""
  if bits not in BITS:
    raise UserError(f"quantized base bits {bits} is not supported: use 4 or 8")

  def init(key, params):
    adapters = lora.init(key, params, targets, rank)
    return quantize_params(params, quantize_pattern, bits, block_size), adapters

  def combine(frozen, adapters, key=None):
    return lora.apply(dequantize_params(frozen), adapters, alpha, dropout=dropout, key=key), {}

  return Method("qlora", init, combine)

