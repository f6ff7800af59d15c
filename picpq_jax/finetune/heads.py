"""Classifier heads that start above chance: label prompts and a closed-form probe.

Zeroth-order fine-tuning barely moves a randomly initialized head (Malladi et al.
2023, MeZO, Sec. 3: its SST-2 results start from a prompt whose zero-shot accuracy
is far above chance). For a sentence encoder such as all-MiniLM-L6-v2, trained so
that the cosine of two sentence embeddings measures their similarity, the analogue
of a cloze with label words is a head of label prompts; a linear probe fitted on
the k examples (the first stage of LP-FT, Kumar et al. 2022) is the other usual
start. Both are a :class:`~picpq_jax.finetune.bert.ClassifierHead` with
``pooling="sentence"`` (logits ``e(x) @ kernel + bias``, ``e(x)`` the unit-norm
sentence embedding ``[H]``) whose Dense parameters are set, not drawn:

* :func:`label_head` (zero-shot, no training data): with ``p_c`` the sentence
  embedding of class ``c``'s label prompt (e.g. ``"It was great."``),

      logits_c = s * cos(e(x), p_c) = s * e(x) . p_c / |p_c|,   bias = 0

  so ``kernel = s * normalize(P)^T`` ``[H, C]``; ``s`` (an inverse temperature) only
  sets how confident the softmax is, not which class wins.
* :func:`ridge_probe` (the k examples): ridge regression of targets ``m * (2 y_onehot
  - 1)`` (``+m`` for the true class, ``-m`` for the others, in logit units) on the
  embeddings, with an unpenalized intercept:

      W = (Xc^T Xc + lambda I)^{-1} Xc^T Yc,   b = mean(Y) - mean(X) W

  where ``Xc``, ``Yc`` are ``X`` ``[N, H]`` and ``Y`` ``[N, C]`` with their column means
  removed (the closed form of ``min ||X W + b - Y||^2 + lambda ||W||^2``).

Every method (first-order, MeZO, the federated rounds) then trains from the head
:func:`start_head` builds; ``picpq finetune --head labels|probe`` selects it.

Zeroth-order training of the head alone (``--zo-part head``) needs many steps
(SPSA's variance grows with the ``H * C + C`` dimensions it moves in), and with the
encoder frozen and no dropout a batch's loss depends on the encoder only through its
sentences' embeddings: :func:`embedded_loss` computes them once and gives the loss of
the head over them, the same loss as the whole classifier's, optionally plus a pull
towards the start, ``l2 / 2 * ||theta - theta_0||^2`` (``--head-l2``): on k examples
per class the head-only objective is a convex logistic regression in ``H * C + C``
dimensions that overfits 2k examples (experiments/finetune/head_sweep.py).

The same cut one level lower: with ``layers`` top blocks moving as well
(``--zo-layers``), :func:`embedded_loss` caches the token states below them and runs
those blocks and the head per step (:func:`top_logits`); a whole block costs two
block forward passes per MeZO step. ``--zo-part ffn`` moves only LoRA factors on the
top block's feed-forward output, that block's last LayerNorm and the head: what that
output layer sees and the residual sum it adds to are cached (:func:`ffn_cache`), so a
step costs a rank-r product per token (:func:`ffn_loss`, :func:`ffn_method`).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from picpq_jax.errors import UserError
from picpq_jax.finetune import lora, peft
from picpq_jax.finetune.config import HEADS
from picpq_jax.finetune.attention import padding_mask
from picpq_jax.finetune.bert import (BertClassifier, BertEncoder, BertLayer, ClassifierHead,
                                     hidden_at, run_blocks, sentence_embedding)
from picpq_jax.finetune.peft import Method
from picpq_jax.finetune.text import TokenizedText, eval_text_batches

Array = jax.Array
PROBE_MARGIN = 2.0  # m: the probe's target logits are +m (true class) and -m
EMBED_BATCH = 64


def pooling_for(head: str) -> str:
  """The :class:`~picpq_jax.finetune.bert.ClassifierHead` pooling a head needs:
  ``"mean"`` for a random head (as before), the unit-norm ``"sentence"`` embedding
  for ``labels`` and ``probe``."""
  if head not in HEADS:
    raise UserError(f"unknown head {head!r}: use one of {', '.join(HEADS)}")
  return "mean" if head == "random" else "sentence"


def label_head(prompt_embeddings: Array | np.ndarray, scale: float) -> dict[str, Array]:
  """The zero-shot label-prompt head: ``logits_c = scale * cos(e(x), p_c)``.

  Args:
    prompt_embeddings: float ``[C, H]``, the sentence embedding of each class's
      label prompt (row ``c`` for class ``c``; need not be unit-norm).
    scale: ``s > 0``, the inverse temperature.

  Returns:
    ``{"kernel": float32 [H, C], "bias": float32 [C]}`` with ``kernel = s *
    normalize(P)^T`` and ``bias = 0``.
  """
  if not scale > 0:
    raise UserError(f"label head scale must be positive, got {scale}")
  p = jnp.asarray(prompt_embeddings, jnp.float32)
  if p.ndim != 2 or p.shape[0] < 2:
    raise UserError(f"label prompt embeddings must be [classes >= 2, H], got {p.shape}")
  unit = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
  return {"kernel": scale * unit.T, "bias": jnp.zeros((p.shape[0],), jnp.float32)}


def ridge_probe(features: Array | np.ndarray, labels: Array | np.ndarray, num_classes: int,
                l2: float, margin: float = PROBE_MARGIN) -> dict[str, Array]:
  """A linear probe fitted in closed form (ridge regression, unpenalized intercept).

  Args:
    features: float ``[N, H]`` (sentence embeddings of the training examples).
    labels: int ``[N]`` in ``[0, num_classes)``.
    num_classes: ``C >= 2``.
    l2: ``lambda >= 0``; with ``lambda = 0`` and ``N <= H`` the system is singular
      and the least-norm solution is returned (``lstsq``).
    margin: ``m``, targets ``+m`` for the true class, ``-m`` for the others.

  Returns:
    ``{"kernel": float32 [H, C], "bias": float32 [C]}``: ``W = (Xc^T Xc + lambda
    I)^{-1} Xc^T Yc`` and ``b = mean(Y) - mean(X) W`` (computed in float64).
  """
  x = np.asarray(features, np.float64)
  y = np.asarray(labels)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise UserError(f"probe needs features [N, H] and labels [N], got {x.shape}, {y.shape}")
  if l2 < 0:
    raise UserError(f"probe l2 must be >= 0, got {l2}")
  targets = margin * (2.0 * np.eye(num_classes)[y] - 1.0)
  mx, my = x.mean(0), targets.mean(0)
  xc, yc = x - mx, targets - my
  gram = xc.T @ xc + l2 * np.eye(x.shape[1])
  kernel = np.linalg.lstsq(gram, xc.T @ yc, rcond=None)[0]
  bias = my - mx @ kernel
  return {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}


def sentence_embeddings(encoder: BertEncoder, params, data: TokenizedText,
                        batch_size: int = EMBED_BATCH) -> np.ndarray:
  """Unit-norm sentence embeddings ``[N, H]`` (float32) of tokenized text, computed
  without dropout in batches of ``batch_size`` (the last one padded and cut off)."""
  @jax.jit
  def embed(p, ids, mask):
    return sentence_embedding(encoder.apply({"params": p}, ids, mask), mask)

  out = [np.asarray(embed(params, b["input_ids"], b["attention_mask"]))[b["mask"]]
         for b in eval_text_batches(data, batch_size)]
  return np.concatenate(out)


def start_head(head: str, model: BertClassifier, params: dict,
               tokenize: Callable[[list[str]], TokenizedText], train: TokenizedText, *,
               prompts: tuple[str, ...] = (), scale: float = 20.0, l2: float = 10.0) -> dict:
  """``params`` (from :func:`~picpq_jax.finetune.bert.init_classifier`) with the head
  ``head`` built from the encoder's own embeddings.

  Args:
    head: ``"random"`` (returned unchanged), ``"labels"`` or ``"probe"``.
    model: the classifier (``pooling="sentence"`` for labels/probe).
    params: ``{"encoder": ..., "head": {"classifier": ...}}``.
    tokenize: texts -> :class:`TokenizedText` (labels ignored).
    train: the tokenized training examples (probe).
    prompts: one label prompt per class, class 0 first (labels).
    scale: the label head's inverse temperature.
    l2: the probe's ridge ``lambda``.

  Returns:
    The params with ``head/classifier`` replaced.
  """
  if head == "random":
    return params
  if model.pooling != "sentence":
    raise UserError(f"the {head} head needs pooling='sentence', got {model.pooling!r}")
  encoder = BertEncoder(model.config, model.dtype)
  if head == "labels":
    if len(prompts) != model.num_classes:
      raise UserError(f"--label-prompts gives {len(prompts)} prompts for "
                      f"{model.num_classes} classes: give one per class, separated by '|'")
    dense = label_head(sentence_embeddings(encoder, params["encoder"], tokenize(list(prompts))),
                       scale)
  elif head == "probe":
    x = sentence_embeddings(encoder, params["encoder"], train)
    dense = ridge_probe(x, train.labels, model.num_classes, l2)
  else:
    raise UserError(f"unknown head {head!r}: use one of {', '.join(HEADS)}")
  return {**params, "head": {**params["head"], "classifier": dense}}


def pull_to_start(theta: dict, start: dict, l2: float) -> Array:
  """``l2 / 2 * sum ||theta_leaf - start_leaf||^2`` over matching pytrees (float32
  ``[]``): the ridge penalty towards the start rather than towards zero."""
  sq = jax.tree.map(lambda a, b: jnp.sum(jnp.square(a - b)), theta, start)
  return 0.5 * l2 * sum(jax.tree.leaves(sq))


def cached_hidden(encoder: BertEncoder, params, data: TokenizedText, cut: int,
                  batch_size: int = EMBED_BATCH) -> np.ndarray:
  """Token states ``[N, L, H]`` (float32) of tokenized text after the embedding layer and
  the first ``cut`` blocks (:func:`~picpq_jax.finetune.bert.hidden_at`), computed without
  dropout in batches of ``batch_size`` (the last one padded and cut off)."""
  @jax.jit
  def run(p, ids, mask):
    return hidden_at(encoder, p, ids, mask, cut).astype(jnp.float32)

  out = [np.asarray(run(params, b["input_ids"], b["attention_mask"]))[b["mask"]]
         for b in eval_text_batches(data, batch_size)]
  return np.concatenate(out)


def top_pattern(layers: int, num_layers: int) -> str:
  """The parameter paths ``--zo-part head --zo-layers layers`` moves: the classifier
  head and the encoder's top ``layers`` blocks (``^head/`` for ``layers = 0``)."""
  blocks = "|".join(f"layer_{i}" for i in range(num_layers - layers, num_layers))
  return f"^head/|^encoder/({blocks})/" if layers else "^head/"


def top_logits(model: BertClassifier, params: dict, hidden: Array, attention_mask: Array,
               layers: int) -> Array:
  """The classifier's logits from token states cached below its top ``layers`` blocks.

  Args:
    model: the classifier.
    params: ``{"encoder": {... "layer_N" for the top blocks}, "head": ...}``.
    hidden: float [B, L, H], the states after block ``num_layers - layers - 1``
      (:func:`cached_hidden` with ``cut = num_layers - layers``).
    attention_mask: int [B, L].
    layers: static, the top blocks to run (0: the head alone).

  Returns:
    float32 [B, classes]: ``model``'s logits without dropout.
  """
  n = model.config.num_layers
  x = (run_blocks(model.config, params["encoder"], hidden, attention_mask, n - layers, n,
                  model.dtype) if layers else hidden)
  head = ClassifierHead(model.num_classes, model.pooling, 0.0)
  return head.apply({"params": params["head"]}, x, attention_mask)


def embedded_loss(model: BertClassifier, params: dict, data: TokenizedText, l2: float = 0.0,
                  layers: int = 0) -> tuple[TokenizedText, Callable]:
  """The classifier's loss with the frozen bottom of the encoder computed once.

  With no dropout and only the head and the top ``layers`` blocks moving, example
  ``i``'s logits depend on the frozen part only through its token states ``X_i``
  ``[L, H]`` after the first ``cut = num_layers - layers`` blocks. ``X`` ``[N, L, H]``
  (and the padding masks) of ``data`` are computed here once; the loss runs the top
  blocks (:func:`~picpq_jax.finetune.bert.run_blocks`) and the model's head on them.
  ``layers = 0`` is the head alone: then the cache is each example's unit sentence
  embedding ``[N, 1, H]`` (a one-token state that the head's pooling returns as it
  is), not its ``L`` token states. The returned ``rows``
  carry each example's index in place of its tokens, so the batching of tokenized
  text (:func:`~picpq_jax.finetune.text.text_batches`, the federated clients' shares)
  batches them unchanged.

  Args:
    model: the classifier (``pooling="sentence"``).
    params: ``{"encoder": ..., "head": {"classifier": {"kernel", "bias"}}}``, the start.
    data: the tokenized training examples, N of them.
    l2: ``>= 0``; the loss adds :func:`pull_to_start` of the head towards
      ``params``' head (the start), scaled by ``l2``.
    layers: ``0 <= layers <= num_layers``, the top blocks the loss runs (and reads
      from its ``params``); the blocks below are read here only.

  Returns:
    ``(rows, loss_fn)``: ``rows`` a :class:`TokenizedText` with ``input_ids`` int32
    ``[N, 1]`` (the row ``i``), ``attention_mask`` ones ``[N, 1]`` and ``data``'s
    labels; ``loss_fn(params, batch, key) -> float32 []`` the mean cross-entropy of
    the model's logits for the rows ``batch["input_ids"][:, 0]`` plus the pull towards
    the start (``params["encoder"]`` top blocks and ``params["head"]`` read; ``key``
    unused: no dropout).
  """
  _check_sentence(model, l2)
  num_layers = model.config.num_layers
  if not 0 <= layers <= num_layers:
    raise UserError(f"--zo-layers={layers} is outside the encoder's {num_layers} blocks: "
                    f"use 0..{num_layers}")
  encoder = BertEncoder(model.config, model.dtype)
  start = jax.tree.map(jnp.asarray, params["head"]["classifier"])
  if layers:
    hidden = cached_hidden(encoder, params["encoder"], data, num_layers - layers)
    masks = data.attention_mask
  else:  # the head pools to the unit embedding: cache that, as a one-token state
    hidden = sentence_embeddings(encoder, params["encoder"], data)[:, None, :]
    masks = np.ones(hidden.shape[:2], np.int32)
  hidden, masks = jnp.asarray(hidden), jnp.asarray(masks)

  def logits_fn(params, index):
    return top_logits(model, params, hidden[index], masks[index], layers)
  return _index_rows(data), _cross_entropy(logits_fn, start, l2, hidden.nbytes)


def _check_sentence(model: BertClassifier, l2: float) -> None:
  if model.pooling != "sentence":
    raise UserError(f"the head's loss over sentence embeddings needs pooling='sentence' "
                    f"(--head labels or probe), got {model.pooling!r}")
  if l2 < 0:
    raise UserError(f"--head-l2 must be >= 0, got {l2}")


def _index_rows(data: TokenizedText) -> TokenizedText:
  """Example ``i`` as the one-token row ``[i]`` (mask ones), ``data``'s labels."""
  n = len(data.labels)
  return TokenizedText(np.arange(n, dtype=np.int32)[:, None], np.ones((n, 1), np.int32),
                       data.labels)


def _cross_entropy(logits_fn: Callable, start: dict, l2: float, cache_bytes: int) -> Callable:
  """``loss_fn(params, batch, key)``: mean cross-entropy of ``logits_fn(params, rows)``
  for the rows ``batch["input_ids"][:, 0]``, plus the head's pull towards ``start``;
  ``loss_fn.cache_bytes`` is the size of the activations it holds (a constant of the
  compiled step, not in its ``memory_analysis()``)."""
  def loss_fn(params, batch, key=None):
    logits = logits_fn(params, batch["input_ids"][:, 0])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss + pull_to_start(params["head"]["classifier"], start, l2) if l2 else loss
  loss_fn.cache_bytes = int(cache_bytes)
  return loss_fn


# ------------------------------------------------------------ the top block's feed-forward

def ffn_target(num_layers: int) -> str:
  """The module ``--zo-part ffn`` adapts: the top block's feed-forward output Dense."""
  return f"layer_{num_layers - 1}/mlp/output"


def ffn_pattern(num_layers: int) -> str:
  """The parameter paths ``--zo-part ffn`` moves: the LoRA factors of
  :func:`ffn_target`, the top block's last LayerNorm and the classifier head."""
  top = f"^encoder/layer_{num_layers - 1}/"
  return f"^head/|{top}mlp/output/lora_|{top}mlp_norm/"


def ffn_cache(model: BertClassifier, encoder_params, data: TokenizedText,
              batch_size: int = EMBED_BATCH) -> tuple[np.ndarray, np.ndarray]:
  """What the top block's feed-forward output layer sees and adds, computed once.

  With ``x`` the top block's state after its attention and LayerNorm, ``u = gelu(x
  W_1 + b_1)`` ``[N, L, I]`` (the input of ``mlp/output``) and ``r = x + u W_2 + b_2``
  ``[N, L, H]`` (the residual sum before the block's last LayerNorm), both float32,
  no dropout; the block's output is ``LayerNorm(r)``."""
  c = model.config
  encoder, top = BertEncoder(c, model.dtype), f"layer_{c.num_layers - 1}"

  @jax.jit
  def run(p, ids, mask):
    x = hidden_at(encoder, p, ids, mask, c.num_layers - 1)
    _, state = BertLayer(c, model.dtype).apply(
        {"params": p[top]}, x, padding_mask(mask), True, capture_intermediates=True)
    seen = state["intermediates"]
    u = jax.nn.gelu(seen["mlp"]["intermediate"]["__call__"][0], approximate=False)
    r = seen["attention_norm"]["__call__"][0] + seen["mlp"]["output"]["__call__"][0]
    return u.astype(jnp.float32), r.astype(jnp.float32)

  parts = [jax.tree.map(lambda a, m=b["mask"]: np.asarray(a)[m],
                        run(encoder_params, b["input_ids"], b["attention_mask"]))
           for b in eval_text_batches(data, batch_size)]
  return tuple(np.concatenate(a) for a in zip(*parts))


def ffn_logits(model: BertClassifier, params: dict, inner: Array, residual: Array,
               attention_mask: Array, alpha: float) -> Array:
  """The classifier's logits with LoRA on the top block's feed-forward output.

  Args:
    model: the classifier.
    params: the encoder's top block with ``mlp/output/{lora_a [I, r], lora_b [r, H]}``
      and ``mlp_norm``, and the head.
    inner, residual: ``u`` [B, L, I] and ``r`` [B, L, H] of :func:`ffn_cache`.
    attention_mask: int [B, L].
    alpha: LoRA's alpha (scale ``alpha / r``).

  Returns:
    float32 [B, classes]: the head over ``LayerNorm(r + (alpha / r) u A B)``, which is
    ``model`` with ``W_2 + (alpha / r) A B`` (:func:`~picpq_jax.finetune.lora.apply`).
  """
  c = model.config
  top = params["encoder"][f"layer_{c.num_layers - 1}"]
  adapter = top["mlp"]["output"]
  a, b = adapter["lora_a"], adapter["lora_b"]
  y = residual + (alpha / a.shape[1]) * ((inner @ a) @ b)  # u W_2' = u W_2 + (alpha/r) u A B
  y = nn.LayerNorm(c.layer_norm_eps, dtype=model.dtype).apply({"params": top["mlp_norm"]}, y)
  head = ClassifierHead(model.num_classes, model.pooling, 0.0)
  return head.apply({"params": params["head"]}, y, attention_mask)


def ffn_loss(model: BertClassifier, params: dict, data: TokenizedText, alpha: float,
             l2: float = 0.0) -> tuple[TokenizedText, Callable]:
  """:func:`embedded_loss` for ``--zo-part ffn``: the loss of :func:`ffn_logits` over
  :func:`ffn_cache` of ``data`` (computed here once); ``params`` (the start) need no
  adapters, the loss's ``params`` do (:func:`ffn_method`)."""
  _check_sentence(model, l2)
  start = jax.tree.map(jnp.asarray, params["head"]["classifier"])
  inner, residual = (jnp.asarray(a) for a in ffn_cache(model, params["encoder"], data))
  masks = jnp.asarray(data.attention_mask)

  def logits_fn(params, index):
    return ffn_logits(model, params, inner[index], residual[index], masks[index], alpha)
  return _index_rows(data), _cross_entropy(logits_fn, start, l2,
                                           inner.nbytes + residual.nbytes)


def ffn_method(num_layers: int, rank: int, alpha: float) -> tuple[Method, Method]:
  """``(train, evaluate)`` Methods of ``--zo-part ffn``.

  ``train.init`` adds LoRA factors (:func:`~picpq_jax.finetune.lora.init`, rank
  ``rank``) at :func:`ffn_target` and moves only :func:`ffn_pattern`; its ``combine``
  gives the tree with the factors, for :func:`ffn_loss`. ``evaluate.combine`` folds
  them into ``W_2`` (:func:`~picpq_jax.finetune.lora.apply`) for the whole model.
  """
  pattern, target = ffn_pattern(num_layers), ffn_target(num_layers)

  def init(key, params):
    adapters = lora.init(key, params["encoder"], f"^{target}$", rank)
    tree = peft.unflatten({**peft.flatten(params),
                           **{"encoder/" + k: v for k, v in peft.flatten(adapters).items()}})
    return peft.only(pattern, "ffn").init(key, tree)

  def fold(frozen, trainable, key=None):
    flat = peft.flatten(peft.merge(frozen, trainable))
    is_adapter = lambda p: p.rsplit("/", 1)[-1] in ("lora_a", "lora_b")  # noqa: E731
    base = peft.unflatten({p: v for p, v in flat.items() if not is_adapter(p)})
    adapters = peft.unflatten({p: v for p, v in flat.items() if is_adapter(p)})
    return lora.apply(base, adapters, alpha), {}

  merged = lambda frozen, trainable, key=None: (peft.merge(frozen, trainable), {})  # noqa: E731
  return Method("ffn", init, merged), Method("ffn", init, fold)
