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
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from picpq_jax.errors import UserError
from picpq_jax.finetune.config import HEADS
from picpq_jax.finetune.bert import BertClassifier, BertEncoder, sentence_embedding
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


def embedded_loss(model: BertClassifier, params: dict, data: TokenizedText, l2: float = 0.0
                  ) -> tuple[TokenizedText, Callable]:
  """The classifier's loss with the encoder's sentence embeddings computed once.

  With a frozen encoder and no dropout, ``model``'s logits for example ``i`` are
  ``e_i @ kernel + bias`` (``e_i`` its unit sentence embedding, ``pooling=
  "sentence"``). The embeddings ``E`` ``[N, H]`` of ``data`` are computed here; the
  returned ``rows`` carry each example's row of ``E`` in place of its tokens, so the
  batching of tokenized text (:func:`~picpq_jax.finetune.text.text_batches`, the
  federated clients' shares) batches them unchanged.

  Args:
    model: the classifier (``pooling="sentence"``).
    params: ``{"encoder": ..., "head": {"classifier": {"kernel", "bias"}}}``.
    data: the tokenized training examples, N of them.
    l2: ``>= 0``; the loss adds :func:`pull_to_start` of the head towards
      ``params``' head (the start), scaled by ``l2``.

  Returns:
    ``(rows, loss_fn)``: ``rows`` a :class:`TokenizedText` with ``input_ids`` int32
    ``[N, 1]`` (the row ``i``), ``attention_mask`` ones ``[N, 1]`` and ``data``'s
    labels; ``loss_fn(params, batch, key) -> float32 []`` the mean cross-entropy of
    ``E[batch["input_ids"][:, 0]] @ kernel + bias`` plus the pull towards the start
    (``params["head"]`` read only; ``key`` unused: no dropout).
  """
  if model.pooling != "sentence":
    raise UserError(f"the head's loss over sentence embeddings needs pooling='sentence' "
                    f"(--head labels or probe), got {model.pooling!r}")
  if l2 < 0:
    raise UserError(f"--head-l2 must be >= 0, got {l2}")
  start = jax.tree.map(jnp.asarray, params["head"]["classifier"])
  table = jnp.asarray(sentence_embeddings(BertEncoder(model.config, model.dtype),
                                          params["encoder"], data))
  n = len(data.labels)
  rows = TokenizedText(np.arange(n, dtype=np.int32)[:, None], np.ones((n, 1), np.int32),
                       data.labels)

  def loss_fn(params, batch, key=None):
    dense = params["head"]["classifier"]
    logits = table[batch["input_ids"][:, 0]] @ dense["kernel"] + dense["bias"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss + pull_to_start(dense, start, l2) if l2 else loss
  return rows, loss_fn
