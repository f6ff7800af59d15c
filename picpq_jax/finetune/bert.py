"""A BERT encoder in Flax linen that matches all-MiniLM-L6-v2, and its heads.

The architecture is Hugging Face's ``BertModel`` (post-LayerNorm blocks, exact
GELU, learned absolute positions, token types), so the pretrained weights load
one to one (:func:`picpq_jax.finetune.pretrained.load_minilm`). The parameter
tree, with ``N`` the layer index::

  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
  embeddings/layer_norm/{scale,bias}
  layer_N/attention/{query,key,value,output}/{kernel,bias}
  layer_N/attention_norm/{scale,bias}
  layer_N/mlp/{intermediate,output}/{kernel,bias}
  layer_N/mlp_norm/{scale,bias}

Prompt tuning: :class:`BertEncoder` takes an optional soft prompt [P, H],
prepended to the sequence after the embedding layer (after its LayerNorm, so
the prompt gets no position or token-type embedding) and always attended to.
The encoder then returns P + L positions; the prompt's outputs come first and
the pooling functions here skip them.

A sentence embedding is what sentence-transformers computes for this model
(its ``modules.json``: Transformer, Pooling with mean tokens, Normalize): the
mask-weighted mean of the token states, L2-normalized.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from picpq_jax.errors import UserError
from picpq_jax.finetune.attention import Mlp, SelfAttention, check_sizes, padding_mask

Array = jax.Array
POOLINGS = ("mean", "cls", "sentence")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes of a BERT encoder; the defaults are all-MiniLM-L6-v2's.

  Attributes:
    vocab_size: word-piece vocabulary size.
    hidden_size: H, width of every token state.
    num_layers: transformer blocks.
    num_heads: attention heads (H must be a multiple).
    intermediate_size: width of the feed-forward layer.
    max_position: longest sequence the position table covers.
    type_vocab_size: token types (segments).
    layer_norm_eps: LayerNorm epsilon.
    hidden_dropout: dropout after embeddings and each residual branch.
    attention_dropout: dropout on attention probabilities.
    pad_token_id: id of [PAD].
  """
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  pad_token_id: int = 0

  def __post_init__(self):
    check_sizes(self, ("vocab_size", "hidden_size", "num_layers", "num_heads",
                       "intermediate_size", "max_position", "type_vocab_size"),
                "hidden_size", ("hidden_dropout", "attention_dropout"))

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> BertConfig:
    """The config of a Hugging Face ``config.json`` (a ``BertModel``).

    Raises:
      UserError: an activation other than exact GELU or non-absolute positions,
        which this encoder does not implement.
    """
    if hf.get("hidden_act", "gelu") != "gelu":
      raise UserError(f"hidden_act {hf['hidden_act']!r} is not supported: this encoder "
                      "implements BERT's exact 'gelu' only")
    if hf.get("position_embedding_type", "absolute") != "absolute":
      raise UserError(f"position_embedding_type {hf['position_embedding_type']!r} is not "
                      "supported: only 'absolute'")
    return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
               num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
               intermediate_size=hf["intermediate_size"],
               max_position=hf["max_position_embeddings"],
               type_vocab_size=hf["type_vocab_size"], layer_norm_eps=hf["layer_norm_eps"],
               hidden_dropout=hf["hidden_dropout_prob"],
               attention_dropout=hf["attention_probs_dropout_prob"],
               pad_token_id=hf.get("pad_token_id", 0))


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
    """input_ids, token_type_ids int [B, L] -> [B, L, H]."""
    c = self.config
    embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, name=name)
    positions = jnp.arange(input_ids.shape[1])[None]
    x = (embed(c.vocab_size, "word_embeddings")(input_ids)
         + embed(c.max_position, "position_embeddings")(positions)
         + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids))
    x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layer_norm")(x)
    return nn.Dropout(c.hidden_dropout)(x, deterministic=deterministic)


class BertLayer(nn.Module):
  """One post-LayerNorm block: ``LN(x + attn(x))`` then ``LN(y + mlp(y))``."""
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    """x [B, L, H], mask bool [B, 1, 1, L] -> [B, L, H]."""
    c = self.config
    drop = nn.Dropout(c.hidden_dropout)
    norm = lambda name: nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name=name)
    y = SelfAttention(c.num_heads, c.attention_dropout, self.dtype, name="attention")(
        x, mask, deterministic)
    x = norm("attention_norm")(x + drop(y, deterministic=deterministic))
    y = Mlp(c.intermediate_size, self.dtype, name="mlp")(x)
    return norm("mlp_norm")(x + drop(y, deterministic=deterministic))


class BertEncoder(nn.Module):
  """The BERT encoder: embeddings, optional soft prompt, ``num_layers`` blocks.

  Attributes:
    config: sizes and dropout rates.
    dtype: computation dtype (parameters stay float32).
    remat: rematerialize each block on the backward pass (``nn.remat``, i.e.
      ``jax.checkpoint``): activation memory of one block instead of all, for
      about one more forward pass of compute. Same parameter tree either way.
  """
  config: BertConfig
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, prompt: Array | None = None,
               deterministic: bool = True) -> Array:
    """Token states of a batch.

    Args:
      input_ids: int [B, L], L <= ``config.max_position``.
      attention_mask: int or bool [B, L], 1 for real tokens, 0 for padding;
        default all ones.
      token_type_ids: int [B, L]; default zeros.
      prompt: float [P, H] or [B, P, H], a soft prompt prepended after the
        embedding layer; P = 0 is the same as no prompt.
      deterministic: False enables dropout (needs a ``"dropout"`` rng).

    Returns:
      [B, P + L, H] in ``dtype``: the prompt's P outputs, then the tokens'.
    """
    c = self.config
    chex.assert_rank(input_ids, 2)
    batch, length = input_ids.shape
    if length > c.max_position:
      raise UserError(f"sequences of {length} tokens exceed the {c.max_position} positions "
                      "of this encoder; truncate to max_len <= "
                      f"{c.max_position}")
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    chex.assert_equal_shape([input_ids, attention_mask, token_type_ids])
    x = BertEmbeddings(c, self.dtype, name="embeddings")(input_ids, token_type_ids,
                                                          deterministic)
    if prompt is not None:
      prompt = _batched_prompt(prompt, batch, c.hidden_size).astype(x.dtype)
      x = jnp.concatenate([prompt, x], axis=1)
      attention_mask = jnp.concatenate(
          [jnp.ones((batch, prompt.shape[1]), attention_mask.dtype), attention_mask], axis=1)
    mask = padding_mask(attention_mask)
    layer = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
    for i in range(c.num_layers):
      x = layer(c, self.dtype, name=f"layer_{i}")(x, mask, deterministic)
    return x


def run_blocks(config: BertConfig, params: Any, x: Array, attention_mask: Array,
               start: int, stop: int, dtype: jnp.dtype = jnp.float32) -> Array:
  """Blocks ``layer_start .. layer_{stop-1}`` of a :class:`BertEncoder`, no dropout.

  Args:
    config: the encoder's sizes.
    params: the encoder's parameter tree (``layer_N`` read for ``start <= N < stop``).
    x: float [B, L, H], the token states after block ``start - 1`` (the embedding
      layer's output for ``start = 0``).
    attention_mask: int or bool [B, L].
    start, stop: static block range, ``0 <= start <= stop <= num_layers``.

  Returns:
    [B, L, H] in ``dtype``: what the encoder's blocks ``start .. stop - 1`` make of ``x``.
  """
  mask = padding_mask(attention_mask)
  for i in range(start, stop):
    x = BertLayer(config, dtype).apply({"params": params[f"layer_{i}"]}, x, mask, True)
  return x


def hidden_at(encoder: BertEncoder, params: Any, input_ids: Array, attention_mask: Array,
              cut: int) -> Array:
  """Token states after the embedding layer and the first ``cut`` blocks, no dropout.

  Args:
    encoder: the encoder (its config and dtype).
    params: its parameter tree.
    input_ids, attention_mask: int [B, L].
    cut: static, ``0 <= cut <= num_layers``; ``cut = num_layers`` is the encoder's output.

  Returns:
    [B, L, H]; ``run_blocks(..., cut, num_layers)`` of it is ``encoder``'s output.
  """
  c = encoder.config
  x = BertEmbeddings(c, encoder.dtype).apply({"params": params["embeddings"]}, input_ids,
                                             jnp.zeros_like(input_ids), True)
  return run_blocks(c, params, x, attention_mask, 0, cut, encoder.dtype)


def _batched_prompt(prompt: Array, batch: int, hidden: int) -> Array:
  """[P, H] or [B, P, H] -> [B, P, H]."""
  if prompt.ndim == 2:
    prompt = jnp.broadcast_to(prompt[None], (batch,) + prompt.shape)
  if prompt.ndim != 3 or prompt.shape[0] != batch or prompt.shape[2] != hidden:
    raise UserError(f"prompt must be [P, {hidden}] or [{batch}, P, {hidden}], got "
                    f"{tuple(prompt.shape)}")
  return prompt


def token_states(hidden: Array, attention_mask: Array) -> Array:
  """The sentence tokens' states, without a soft prompt's leading outputs.

  Args:
    hidden: [B, P + L, H] from :class:`BertEncoder`.
    attention_mask: [B, L].

  Returns:
    [B, L, H]: ``hidden[:, P:]`` with ``P = hidden.shape[1] - L``.
  """
  prompt_len = hidden.shape[1] - attention_mask.shape[1]
  if prompt_len < 0:
    raise UserError(f"hidden has {hidden.shape[1]} positions, fewer than the mask's "
                    f"{attention_mask.shape[1]}")
  return hidden[:, prompt_len:]


def mean_pool(hidden: Array, attention_mask: Array) -> Array:
  """Mask-weighted mean over tokens, as sentence-transformers' Pooling.

  Args:
    hidden: [B, P + L, H]; a leading soft prompt (P > 0) is skipped.
    attention_mask: [B, L], 1 for real tokens.

  Returns:
    float32 [B, H]: ``sum(h * m) / max(sum(m), 1e-9)``.
  """
  tokens = token_states(hidden, attention_mask).astype(jnp.float32)
  m = jnp.asarray(attention_mask, jnp.float32)[..., None]
  return (tokens * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """``x / max(||x||, eps)`` along the last axis (torch ``F.normalize``)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def sentence_embedding(hidden: Array, attention_mask: Array) -> Array:
  """The all-MiniLM-L6-v2 sentence embedding: mean pooling, then L2 norm.

  Args:
    hidden: [B, P + L, H] from :class:`BertEncoder`.
    attention_mask: [B, L].

  Returns:
    float32 [B, H], unit rows.
  """
  return l2_normalize(mean_pool(hidden, attention_mask))


class ClassifierHead(nn.Module):
  """Pooling, dropout and a linear layer over encoder states.

  Attributes:
    num_classes: output logits.
    pooling: ``"mean"`` (default): the masked mean of the token states, not
      normalized; this is the representation all-MiniLM-L6-v2 was trained to
      produce. ``"cls"``: the first real token ([CLS]) through
      ``pooler`` = Dense(H) + tanh, as Hugging Face's
      ``BertForSequenceClassification`` (the checkpoint's pooler weights come
      from the original MiniLM, not sentence-transformers training).
      ``"sentence"``: the unit-norm sentence embedding (:func:`sentence_embedding`,
      mean then L2 norm), so that a kernel of label embeddings scores classes by
      cosine similarity (:mod:`picpq_jax.finetune.heads`).
    dropout_rate: dropout on the pooled vector (training only).
  """
  num_classes: int
  pooling: str = "mean"
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, hidden: Array, attention_mask: Array, deterministic: bool = True
              ) -> Array:
    """hidden [B, P + L, H], attention_mask [B, L] -> float32 logits [B, classes]."""
    if self.pooling == "mean":
      pooled = mean_pool(hidden, attention_mask)
    elif self.pooling == "sentence":
      pooled = sentence_embedding(hidden, attention_mask)
    elif self.pooling == "cls":
      cls = token_states(hidden, attention_mask)[:, 0].astype(jnp.float32)
      pooled = jnp.tanh(nn.Dense(hidden.shape[-1], name="pooler")(cls))
    else:
      raise UserError(f"pooling {self.pooling!r} is unknown: use one of {POOLINGS}")
    pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=deterministic)
    dense = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.02),
                     name="classifier")
    return dense(pooled).astype(jnp.float32)


class BertClassifier(nn.Module):
  """Sentence classifier: :class:`BertEncoder` then :class:`ClassifierHead`.

  Parameters: ``{"encoder": <BertEncoder tree>, "head": {"classifier": ...,
  ["pooler": ...]}}``. Build them with :func:`init_classifier` to start from
  pretrained encoder weights.

  Attributes:
    config: encoder sizes; ``config.hidden_dropout`` is also the head's dropout.
    num_classes: number of labels (2 for SST-2).
    pooling: ``"mean"``, ``"cls"`` or ``"sentence"`` (see :class:`ClassifierHead`).
    dtype: encoder computation dtype.
    remat: rematerialize each encoder block.
  """
  config: BertConfig
  num_classes: int
  pooling: str = "mean"
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  def setup(self):
    if self.num_classes < 2:
      raise UserError(f"num_classes must be at least 2, got {self.num_classes}")
    self.encoder = BertEncoder(self.config, self.dtype, self.remat)
    self.head = ClassifierHead(self.num_classes, self.pooling, self.config.hidden_dropout)

  def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
               prompt: Array | None = None, deterministic: bool = True) -> Array:
    """input_ids, attention_mask [B, L] (prompt [P, H]) -> float32 logits [B, classes]."""
    hidden = self.encoder(input_ids, attention_mask, token_type_ids, prompt, deterministic)
    return self.head(hidden, attention_mask, deterministic)


def init_classifier(key: Array, model: BertClassifier, encoder_params: Any,
                    pooler: Any | None = None) -> dict:
  """Classifier parameters around given (pretrained) encoder parameters.

  Only the head is drawn (cheap; the encoder is not initialized twice).

  Args:
    key: PRNG key for the head.
    model: the classifier.
    encoder_params: a :class:`BertEncoder` parameter tree (e.g. ``load_minilm().params``).
    pooler: ``{"kernel": [H, H], "bias": [H]}`` to start the ``"cls"`` pooler
      from (``load_minilm().pooler``); drawn fresh when None. Ignored for
      ``"mean"`` pooling.

  Returns:
    ``{"encoder": encoder_params, "head": {...}}`` for ``model.apply({"params": ...})``.
  """
  hidden = model.config.hidden_size
  head = ClassifierHead(model.num_classes, model.pooling, model.config.hidden_dropout)
  head_params = head.init(key, jnp.zeros((1, 1, hidden)), jnp.ones((1, 1), jnp.int32))["params"]
  if model.pooling == "cls" and pooler is not None:
    chex.assert_shape([pooler["kernel"], pooler["bias"]], [(hidden, hidden), (hidden,)])
    head_params = {**head_params, "pooler": dict(pooler)}
  return {"encoder": encoder_params, "head": dict(head_params)}
