"""A small causal (GPT-style) language model, trained from scratch.

The generative workload of the fine-tuning methods: token and learned position
embeddings, ``num_layers`` pre-LayerNorm blocks (``x + attn(LN(x))``, ``x +
mlp(LN(x))``) with causal self-attention, a final LayerNorm, and an output
head that by default is tied to the token embedding (``logits = x @ E^T``,
GPT-2's choice: fewer parameters, and the usual choice at this size); set
``tie_embeddings=False`` for a separate ``head`` Dense.

The blocks reuse :mod:`picpq_jax.finetune.attention`, so their projections
have the same names as the BERT encoder's (``block_N/attention/{query,key,
value,output}``, ``block_N/mlp/{intermediate,output}``) and the same
parameter-tree transforms (LoRA, BitFit) apply to both.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from picpq_jax.errors import UserError
from picpq_jax.finetune.attention import Mlp, SelfAttention, causal_mask, check_sizes

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Sizes of the GPT.

  Attributes:
    vocab_size: number of token ids (characters for tinyshakespeare).
    num_layers: transformer blocks.
    num_heads: attention heads (width must be a multiple).
    width: model width (embedding size).
    context: longest sequence (positions in the table).
    mlp_ratio: feed-forward width / model width.
    dropout: dropout rate on attention probabilities and residual branches.
    tie_embeddings: output head shares the token embedding matrix.
  """
  vocab_size: int
  num_layers: int = 4
  num_heads: int = 4
  width: int = 128
  context: int = 128
  mlp_ratio: int = 4
  dropout: float = 0.0
  tie_embeddings: bool = True

  def __post_init__(self):
    check_sizes(self, ("vocab_size", "num_layers", "num_heads", "width", "context",
                       "mlp_ratio"), "width", ("dropout",))


class GPTBlock(nn.Module):
  """Pre-LayerNorm block with causal self-attention."""
  config: GPTConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    """x [B, T, W], mask bool [1, 1, T, T] -> [B, T, W]."""
    c = self.config
    drop = nn.Dropout(c.dropout)
    y = nn.LayerNorm(dtype=self.dtype, name="attention_norm")(x)
    y = SelfAttention(c.num_heads, c.dropout, self.dtype, name="attention")(y, mask, deterministic)
    x = x + drop(y, deterministic=deterministic)
    y = nn.LayerNorm(dtype=self.dtype, name="mlp_norm")(x)
    y = Mlp(c.width * c.mlp_ratio, self.dtype, name="mlp")(y)
    return x + drop(y, deterministic=deterministic)


class GPT(nn.Module):
  """Causal language model; see the module docstring for the layout.

  Attributes:
    config: sizes.
    dtype: computation dtype; logits are float32.
    remat: rematerialize each block on the backward pass.
  """
  config: GPTConfig
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, ids: Array, deterministic: bool = True) -> Array:
    """Next-token logits.

    Args:
      ids: int [B, T], T <= ``config.context``.
      deterministic: False enables dropout (needs a ``"dropout"`` rng).

    Returns:
      float32 [B, T, vocab]; position t depends on ``ids[:, :t + 1]`` only.
    """
    c = self.config
    chex.assert_rank(ids, 2)
    length = ids.shape[1]
    if length > c.context:
      raise UserError(f"sequences of {length} tokens exceed the context of {c.context}")
    embed = nn.Embed(c.vocab_size, c.width, dtype=self.dtype,
                     embedding_init=nn.initializers.normal(0.02), name="token_embedding")
    positions = nn.Embed(c.context, c.width, dtype=self.dtype,
                         embedding_init=nn.initializers.normal(0.02), name="position_embedding")
    x = embed(ids) + positions(jnp.arange(length)[None])
    x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
    mask = causal_mask(length)
    block = nn.remat(GPTBlock, static_argnums=(3,)) if self.remat else GPTBlock
    for i in range(c.num_layers):
      x = block(c, self.dtype, name=f"block_{i}")(x, mask, deterministic)
    x = nn.LayerNorm(dtype=self.dtype, name="final_norm")(x)
    if c.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(c.vocab_size, dtype=self.dtype, name="head")(x)
    return logits.astype(jnp.float32)


def init_gpt(key: Array, model: GPT) -> dict:
  """Fresh parameters of ``model`` (the ``params`` collection), drawn from ``key``.

  Initialized in one compiled program (eager init runs op by op, far slower).
  """
  dummy = jnp.zeros((1, model.config.context), jnp.int32)
  return jax.jit(model.init)(key, dummy)["params"]


def loss(model: GPT, params, x: Array, y: Array, dropout_key: Array | None = None) -> Array:
  """Mean next-token cross-entropy.

  Args:
    model: the GPT.
    params: its parameters.
    x: int [B, T] inputs.
    y: int [B, T] targets (``x`` shifted left by one).
    dropout_key: PRNG key enabling dropout; None runs deterministically.

  Returns:
    float32 scalar: ``mean(-log softmax(logits)[b, t, y[b, t]])`` in nats.
  """
  chex.assert_equal_shape([x, y])
  rngs = {"dropout": dropout_key} if dropout_key is not None else {}
  logits = model.apply({"params": params}, x, deterministic=dropout_key is None, rngs=rngs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def generate(model: GPT, params, key: Array, prompt_ids: Array, steps: int,
             temperature: float = 1.0) -> Array:
  """Extends ``prompt_ids`` by ``steps`` sampled tokens (jitted, one program).

  Each step runs the model on the last ``C = min(context, T0 + steps)``
  tokens of a fixed-size buffer (positions counted from that window's start,
  as when a longer text is cropped to the context) and reads the logits at
  the newest token; later buffer slots are not yet written and, by the
  causal mask, cannot affect them. No key/value cache: each step costs one
  forward pass over C tokens, simple and exactly the model's own output.

  Args:
    model: the GPT.
    params: its parameters.
    key: PRNG key; step i samples with ``jax.random.fold_in(key, i)``.
    prompt_ids: int [B, T0], T0 >= 1.
    steps: tokens to add, >= 0.
    temperature: 0 takes the argmax (greedy); otherwise samples from
      ``softmax(logits / temperature)``.

  Returns:
    int32 [B, T0 + steps], the prompt followed by the new tokens.
  """
  chex.assert_rank(prompt_ids, 2)
  if prompt_ids.shape[1] < 1 or steps < 0 or temperature < 0:
    raise UserError(f"generate needs a prompt of >= 1 token, steps >= 0 and temperature "
                    f">= 0, got {prompt_ids.shape[1]} tokens, steps={steps}, "
                    f"temperature={temperature}")
  return _generate_fn(model, steps, float(temperature))(params, key,
                                                         jnp.asarray(prompt_ids, jnp.int32))


@functools.lru_cache(maxsize=16)
def _generate_fn(model: GPT, steps: int, temperature: float):
  """The jitted generation loop for one (model, steps, temperature)."""

  @jax.jit
  def run(params, key, prompt_ids):
    batch, start = prompt_ids.shape
    total = start + steps
    window = min(model.config.context, total)
    buffer = jnp.zeros((batch, total), jnp.int32).at[:, :start].set(prompt_ids)

    def step(i, buffer):
      n = start + i  # Tokens written so far.
      first = jnp.clip(n - window, 0, total - window)
      ids = jax.lax.dynamic_slice(buffer, (0, first), (batch, window))
      logits = model.apply({"params": params}, ids)
      logits = jax.lax.dynamic_index_in_dim(logits, n - 1 - first, axis=1, keepdims=False)
      if temperature == 0.0:
        new = jnp.argmax(logits, axis=-1)
      else:
        new = jax.random.categorical(jax.random.fold_in(key, i), logits / temperature)
      return jax.lax.dynamic_update_slice(buffer, new.astype(jnp.int32)[:, None], (0, n))

    return jax.lax.fori_loop(0, steps, step, buffer)

  return run
