"""Transformer building blocks shared by the BERT encoder and the small GPT.

Every projection is a plain ``nn.Dense`` with a fixed, readable name, so that
parameter-pytree transforms select it by path: ``attention/{query,key,value,
output}`` and ``mlp/{intermediate,output}``, each holding ``kernel`` [in, out]
and ``bias`` [out]. LoRA picks kernels by a pattern such as ``"query|value"``,
BitFit picks every ``bias``.

Attention masks are boolean arrays broadcast against the scores
``[B, heads, Lq, Lk]`` (True: may attend). Masked scores are replaced by the
most negative float32 before a float32 softmax, which gives the same
probabilities as BERT's additive ``finfo.min`` mask and cannot produce NaN
when two masks are combined.
"""

from __future__ import annotations

import math

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from picpq_jax.errors import UserError

Array = jax.Array


def check_sizes(config: Any, positive: Sequence[str], width: str,
                dropouts: Sequence[str]) -> None:
  """UserError unless the named fields are positive, ``width`` is a multiple
  of ``config.num_heads`` and each dropout rate lies in [0, 1)."""
  name = type(config).__name__
  for field in positive:
    if getattr(config, field) < 1:
      raise UserError(f"{name}.{field} must be positive, got {getattr(config, field)}")
  if getattr(config, width) % config.num_heads:
    raise UserError(f"{name}.{width}={getattr(config, width)} must be a multiple of "
                    f"num_heads={config.num_heads}")
  for field in dropouts:
    if not 0.0 <= getattr(config, field) < 1.0:
      raise UserError(f"{name}.{field} must lie in [0, 1), got {getattr(config, field)}")


def padding_mask(attention_mask: Array) -> Array:
  """Key mask for padded batches.

  Args:
    attention_mask: int or bool [B, L], 1/True for real tokens.

  Returns:
    bool [B, 1, 1, L], to broadcast against scores [B, heads, Lq, L].
  """
  return jnp.asarray(attention_mask).astype(bool)[:, None, None, :]


def causal_mask(length: int) -> Array:
  """bool [1, 1, L, L]: query ``t`` may attend to keys ``0..t``."""
  return jnp.tril(jnp.ones((length, length), bool))[None, None]


class SelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention with an output projection.

  Attributes:
    num_heads: heads; the width must be a multiple of it.
    dropout_rate: dropout on the attention probabilities (training only).
    dtype: computation dtype of the projections; scores are softmaxed in float32.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, deterministic: bool) -> Array:
    """x [B, L, W], mask bool broadcastable to [B, heads, L, L] -> [B, L, W]."""
    batch, length, width = x.shape
    head_dim = width // self.num_heads

    def heads(name: str) -> Array:
      y = nn.Dense(width, dtype=self.dtype, name=name)(x)
      return y.reshape(batch, length, self.num_heads, head_dim)

    q, k, v = heads("query"), heads("key"), heads("value")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    scores = scores / math.sqrt(head_dim)
    if mask is not None:
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    out = out.reshape(batch, length, width)
    return nn.Dense(width, dtype=self.dtype, name="output")(out)


class Mlp(nn.Module):
  """Position-wise feed-forward: ``output(gelu(intermediate(x)))``.

  GELU is the exact (erf) form, as Hugging Face BERT's ``"gelu"``.

  Attributes:
    hidden: width of the intermediate layer.
    dtype: computation dtype.
  """
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x [..., W] -> [..., W]."""
    y = nn.Dense(self.hidden, dtype=self.dtype, name="intermediate")(x)
    y = nn.gelu(y, approximate=False)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="output")(y)
