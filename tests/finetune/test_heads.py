"""Label-prompt and ridge-probe heads on hand-made examples, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax.errors import UserError
from picpq_jax.finetune import heads
from picpq_jax.finetune.bert import ClassifierHead
from picpq_jax.finetune.text import TextDataset, held_out


def test_label_head_scores_by_scaled_cosine():
  # prompt embeddings [C=2, H=2]: class 0 along (3, 4), class 1 along (1, 0)
  dense = heads.label_head(np.array([[3.0, 4.0], [1.0, 0.0]]), scale=10.0)
  np.testing.assert_allclose(dense["kernel"], [[6.0, 10.0], [8.0, 0.0]], rtol=1e-6)
  np.testing.assert_array_equal(dense["bias"], [0.0, 0.0])
  x = np.array([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])  # unit sentence embeddings
  logits = x @ np.asarray(dense["kernel"])
  np.testing.assert_allclose(logits, [[8.0, 0.0], [10.0, 6.0], [6.0, 10.0]], rtol=1e-6)
  with pytest.raises(UserError, match="positive"):
    heads.label_head(np.eye(2), scale=0.0)


def _ridge_by_augmented_lstsq(x, y, classes, lam, margin):
  """min ||[X 1] [W; b] - Y||^2 + lam ||W||^2 as one least-squares problem: the
  penalty is sqrt(lam) I rows under X (zero under the intercept column)."""
  n, h = x.shape
  targets = margin * (2.0 * np.eye(classes)[y] - 1.0)
  design = np.block([[x, np.ones((n, 1))], [np.sqrt(lam) * np.eye(h), np.zeros((h, 1))]])
  rhs = np.vstack([targets, np.zeros((h, classes))])
  sol = np.linalg.lstsq(design, rhs, rcond=None)[0]
  return sol[:h], sol[h]


@pytest.mark.parametrize("lam", [0.5, 3.0])
def test_ridge_probe_matches_an_independent_least_squares(lam):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(9, 4))
  y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 1])
  dense = heads.ridge_probe(x, y, 3, lam, margin=2.0)
  kernel, bias = _ridge_by_augmented_lstsq(x, y, 3, lam, 2.0)
  assert dense["kernel"].shape == (4, 3) and dense["bias"].shape == (3,)
  np.testing.assert_allclose(dense["kernel"], kernel, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dense["bias"], bias, rtol=1e-5, atol=1e-6)


def test_ridge_probe_fits_a_hand_made_set_exactly():
  # 3 points in 2-D and an intercept: 3 unknowns per class, so (almost) no penalty
  # fits the targets +-margin exactly
  x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
  y = np.array([1, 1, 0])
  dense = heads.ridge_probe(x, y, 2, 1e-9, margin=2.0)
  logits = x @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
  np.testing.assert_allclose(logits, [[-2.0, 2.0], [-2.0, 2.0], [2.0, -2.0]], atol=1e-5)


def test_sentence_pooling_head_gives_the_cosine_logits():
  rng = np.random.default_rng(1)
  hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.int32)
  prompts = rng.normal(size=(2, 4))
  head = ClassifierHead(2, pooling="sentence")
  params = {"classifier": heads.label_head(prompts, 5.0)}
  got = head.apply({"params": params}, jnp.asarray(hidden), jnp.asarray(mask))
  pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  cos = (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)) @ (
      prompts / np.linalg.norm(prompts, axis=1, keepdims=True)).T
  np.testing.assert_allclose(got, 5.0 * cos, rtol=1e-5, atol=1e-5)


def test_pooling_for_and_unknown_head():
  assert heads.pooling_for("random") == "mean"
  assert heads.pooling_for("labels") == heads.pooling_for("probe") == "sentence"
  with pytest.raises(UserError, match="unknown head"):
    heads.pooling_for("zero")


def test_held_out_leaves_out_every_training_sentence():
  ds = TextDataset(("a", "b", "c", "a", "d", "e", "f"), np.array([0, 1, 0, 0, 1, 1, 0]))
  train = ds.subset([0, 1])  # "a" (twice in the file) and "b"
  out = held_out(ds, train, 3)
  assert len(out) == 3 and not set(out.sentences) & {"a", "b"}
  assert out.sentences == held_out(ds, train, 3).sentences  # fixed
  assert set(held_out(ds, train, 0).sentences) == {"c", "d", "e", "f"}


def test_label_start_scores_its_own_prompt_at_the_scale(tmp_path):
  """End to end on the tiny BERT: a label prompt fed as a sentence has cosine 1 with
  itself, so its own class's logit is exactly the scale."""
  from picpq_jax.finetune import BertClassifier, init_classifier, load_minilm, load_tokenizer
  from picpq_jax.finetune.text import TokenCache
  from tests.finetune import tiny_run
  folder = tiny_run.make_weights(tmp_path / "w")
  pre, tok = load_minilm(folder), load_tokenizer(folder)
  cache = TokenCache(tok)
  tokenize = lambda texts: cache(TextDataset(tuple(texts), np.zeros(len(texts), np.int32)), 16)
  model = BertClassifier(pre.config, 2, pooling="sentence")
  params = init_classifier(jax.random.key(0), model, pre.params)
  prompts = ("the movie was bad", "the movie was good")
  params = heads.start_head("labels", model, params, tokenize, None, prompts=prompts, scale=7.0)
  batch = tokenize(list(prompts))
  logits = np.asarray(model.apply({"params": params}, batch.input_ids, batch.attention_mask))
  np.testing.assert_allclose(np.diag(logits), [7.0, 7.0], rtol=1e-5)
  assert np.all(np.abs(logits) <= 7.0 + 1e-4)
  with pytest.raises(UserError, match="one per class"):
    heads.start_head("labels", model, params, tokenize, None, prompts=("x",))


def test_embedded_loss_equals_the_whole_classifiers_loss(tmp_path):
  """The loss over embeddings computed once against the tiny BERT's own forward pass
  (no dropout), on a batch that picks rows out of order and twice."""
  import optax
  from picpq_jax.finetune import BertClassifier, init_classifier, load_minilm, load_tokenizer
  from picpq_jax.finetune.text import TokenCache
  from tests.finetune import tiny_run
  folder = tiny_run.make_weights(tmp_path / "w")
  pre, cache = load_minilm(folder), TokenCache(load_tokenizer(folder))
  texts = ("the movie was bad", "good", "a good movie was it", "bad bad")
  data = cache(TextDataset(texts, np.array([0, 1, 1, 0], np.int32)), 16)
  model = BertClassifier(pre.config, 2, pooling="sentence")
  params = init_classifier(jax.random.key(0), model, pre.params)
  rows, loss_fn = heads.embedded_loss(model, params, data)
  np.testing.assert_array_equal(rows.input_ids[:, 0], [0, 1, 2, 3])
  pick = np.array([2, 0, 2])
  batch = {"input_ids": rows.input_ids[pick], "attention_mask": rows.attention_mask[pick],
           "label": rows.labels[pick]}
  logits = model.apply({"params": params}, data.input_ids[pick], data.attention_mask[pick])
  want = optax.softmax_cross_entropy_with_integer_labels(logits, data.labels[pick]).mean()
  np.testing.assert_allclose(float(loss_fn(params, batch, None)), float(want), rtol=1e-5)
  # with a pull towards the start: moved by +0.1 in each of the head's `size` entries,
  # the loss adds l2 / 2 * 10 * 0.01 to the moved head's cross-entropy
  _, pulled = heads.embedded_loss(model, params, data, l2=0.5)
  dense = params["head"]["classifier"]
  moved = {**params, "head": {"classifier": jax.tree.map(lambda a: a + 0.1, dense)}}
  logits = model.apply({"params": moved}, data.input_ids[pick], data.attention_mask[pick])
  want = optax.softmax_cross_entropy_with_integer_labels(logits, data.labels[pick]).mean()
  size = dense["kernel"].size + dense["bias"].size
  np.testing.assert_allclose(float(pulled(moved, batch, None)),
                             float(want) + 0.25 * size * 0.01, rtol=1e-5)
  np.testing.assert_allclose(float(pulled(params, batch, None)),
                             float(loss_fn(params, batch, None)), rtol=1e-6)
  with pytest.raises(UserError, match="head-l2"):
    heads.embedded_loss(model, params, data, l2=-1.0)
  with pytest.raises(UserError, match="pooling='sentence'"):
    heads.embedded_loss(BertClassifier(pre.config, 2), params, data)


def test_mezo_improves_on_a_label_start():
  """A synthetic zero-shot start: unit features of two classes that differ along
  ``u`` and share a common direction ``c`` (as sentence embeddings do), and label
  prompts that lean on ``c`` unequally (a miscalibrated zero-shot head, biased
  towards class 0). MeZO over the head (n-SPSA, fixed keys) raises the accuracy on
  held-out points and lowers the training loss."""
  import optax
  from picpq_jax.finetune import mezo
  rng = np.random.default_rng(0)
  dim, n = 8, 512
  u, c = np.eye(dim)[0], np.eye(dim)[1]
  y = rng.integers(0, 2, n)
  x = 0.5 * (2 * y - 1)[:, None] * u + c + 0.4 * rng.normal(size=(n, dim))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  params = heads.label_head(np.stack([-u + 6 * c, u + c]), 5.0)

  def loss_fn(p, batch, key=None):
    logits = batch["x"] @ p["kernel"] + p["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  def accuracy(p, xs, ys):
    return float(np.mean(np.argmax(xs @ np.asarray(p["kernel"]) + np.asarray(p["bias"]), 1)
                         == ys))

  train, test = slice(0, 64), slice(64, n)
  start = accuracy(params, x[test], y[test])
  step = mezo.make_step(loss_fn, eps=1e-3, n=4)
  theta = jax.tree.map(jnp.copy, params)
  batch = {"x": jnp.asarray(x[train], jnp.float32), "y": jnp.asarray(y[train])}
  for i in range(100):
    theta, _ = step.step({}, theta, batch, jax.random.key(i), 0.5)
  assert 0.6 < start < 0.82
  assert accuracy(theta, x[test], y[test]) > start + 0.05
  assert float(loss_fn(theta, batch)) < float(loss_fn(params, batch)) - 0.05


def test_pull_to_start_on_a_hand_made_pair():
  theta = {"kernel": jnp.array([[1.0, 2.0]]), "bias": jnp.array([0.5])}
  start = {"kernel": jnp.array([[0.0, 0.0]]), "bias": jnp.array([1.5])}
  # l2 / 2 * (1 + 4 + 1) with l2 = 2
  assert float(heads.pull_to_start(theta, start, 2.0)) == pytest.approx(6.0)
  assert float(heads.pull_to_start(start, start, 2.0)) == 0.0


@pytest.mark.parametrize("options,needle", [
    (dict(head="probe", federated="fedkseed", method="mezo"), "--head='probe'"),
    (dict(head="first"), "--head='first'"),
    (dict(label_prompts="only one"), "--label-prompts="),
    (dict(eval_split="test"), "--eval-split='test'"),
    (dict(method="qlora", qlora_bits=8, qlora_grid="nf4"), "--qlora-grid='nf4'"),
    (dict(method="mezo", zo_part="head", head="random", dropout=0.0), "--zo-part='head'"),
    (dict(method="mezo", zo_part="head", head="labels", dropout=0.1), "--dropout=0.1"),
    (dict(method="mezo", zo_part="full", head="labels", head_l2=0.1), "--head-l2=0.1"),
    (dict(method="mezo", zo_part="head", head="labels", dropout=0.0, head_l2=-1.0),
     "--head-l2=-1.0"),
    (dict(method="mezo", zo_part="head", head="labels", dropout=0.0, zo_layers=-1),
     "--zo-layers=-1"),
    (dict(method="mezo", zo_part="full", head="labels", zo_layers=1), "--zo-layers=1"),
    (dict(method="lora", zo_layers=2), "--zo-layers=2"),
    (dict(method="mezo", zo_part="ffn", head="labels", dropout=0.1), "--dropout=0.1"),
    (dict(method="mezo", zo_part="ffn", head="random", dropout=0.0), "--zo-part='ffn'"),
])
def test_config_rejects_bad_head_and_grid_options(options, needle):
  from picpq_jax.finetune.config import FinetuneConfig
  with pytest.raises(UserError, match=needle.replace("[", r"\[")):
    FinetuneConfig(**options)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
  """The tiny BERT with sentence pooling, its params (a nonzero head) and 4 sentences."""
  from picpq_jax.finetune import BertClassifier, init_classifier, load_minilm, load_tokenizer
  from picpq_jax.finetune.text import TokenCache
  from tests.finetune import tiny_run
  folder = tiny_run.make_weights(tmp_path_factory.mktemp("tiny") / "w")
  pre, cache = load_minilm(folder), TokenCache(load_tokenizer(folder))
  texts = ("the movie was bad", "good", "a good movie was it", "bad bad")
  data = cache(TextDataset(texts, np.array([0, 1, 1, 0], np.int32)), 16)
  model = BertClassifier(pre.config, 2, pooling="sentence")
  return model, init_classifier(jax.random.key(0), model, pre.params), data


def _batch(rows, pick):
  return {"input_ids": rows.input_ids[pick], "attention_mask": rows.attention_mask[pick],
          "label": rows.labels[pick]}


def _loss_of_logits(logits, labels):
  """Mean cross-entropy in numpy (float64), independent of optax."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return float(-logp[np.arange(len(labels)), labels].mean())


@pytest.mark.parametrize("layers", [1, 2])
def test_top_blocks_on_cached_states_equal_the_whole_forward(tiny_classifier, layers):
  """--zo-part head --zo-layers L: the loss over states cached below the top L blocks,
  with those blocks and the head moved away from the cached start, equals the whole
  classifier's loss (its own forward pass over the tokens) at the moved params."""
  model, params, data = tiny_classifier
  rows, loss_fn = heads.embedded_loss(model, params, data, layers=layers)
  n = model.config.num_layers
  moved = jax.tree.map(lambda a: a * 1.1 + 0.01, params)  # every leaf; only the top is read
  top = {f"layer_{i}" for i in range(n - layers, n)}
  moved = {"head": moved["head"], "encoder": {
      name: (moved if name in top else params)["encoder"][name] for name in params["encoder"]}}
  pick = np.array([3, 1, 3, 0])
  logits = model.apply({"params": moved}, data.input_ids[pick], data.attention_mask[pick])
  np.testing.assert_allclose(float(loss_fn(moved, _batch(rows, pick), None)),
                             _loss_of_logits(logits, data.labels[pick]), rtol=1e-5)
  # the cache holds [N, L, H] float32 token states
  assert loss_fn.cache_bytes == data.input_ids.size * model.config.hidden_size * 4
  with pytest.raises(UserError, match=f"--zo-layers={n + 1} is outside the encoder's {n} blocks"):
    heads.embedded_loss(model, params, data, layers=n + 1)


def test_ffn_lora_on_cached_activations_equals_the_merged_model(tiny_classifier):
  """--zo-part ffn: LoRA on the top block's feed-forward output over the cached
  (u, r) equals the whole classifier with W_2 + (alpha / r) A B folded in by
  lora.apply; only the adapters, that block's last LayerNorm and the head are
  trainable (the run's checkpoint: tests/finetune/test_run.py)."""
  from picpq_jax.finetune import lora, peft
  model, params, data = tiny_classifier
  n = model.config.num_layers
  train, scored = heads.ffn_method(n, rank=2, alpha=4.0)
  frozen, theta = train.init(jax.random.key(1), params)
  top = f"encoder/layer_{n - 1}/"
  assert set(peft.flatten(theta)) == {
      top + "mlp/output/lora_a", top + "mlp/output/lora_b", top + "mlp_norm/scale",
      top + "mlp_norm/bias", "head/classifier/kernel", "head/classifier/bias"}
  theta = jax.tree.map(lambda a: a + 0.05, theta)  # B != 0: the adapter changes the output
  rows, loss_fn = heads.ffn_loss(model, params, data, alpha=4.0)
  flat = peft.flatten(peft.merge(frozen, theta))
  adapters = peft.unflatten({p[len("encoder/"):]: v for p, v in flat.items() if "/lora_" in p})
  base = peft.unflatten({p: v for p, v in flat.items() if "/lora_" not in p})
  folded = {**base, "encoder": lora.apply(base["encoder"], adapters, 4.0)}
  pick = np.array([0, 2, 2, 1])
  logits = model.apply({"params": folded}, data.input_ids[pick], data.attention_mask[pick])
  want = _loss_of_logits(logits, data.labels[pick])
  batch = _batch(rows, pick)
  np.testing.assert_allclose(float(loss_fn(peft.merge(frozen, theta), batch, None)), want,
                             rtol=1e-5)
  evaluated, _ = scored.combine(frozen, theta)  # what the evaluation runs
  np.testing.assert_allclose(model.apply({"params": evaluated}, data.input_ids[pick],
                                         data.attention_mask[pick]), logits, rtol=1e-5)


def test_top_pattern_names_the_head_and_the_top_blocks():
  assert heads.top_pattern(0, 6) == "^head/"
  assert heads.top_pattern(2, 6) == "^head/|^encoder/(layer_4|layer_5)/"


def test_cutting_padding_leaves_the_classifier_loss_unchanged(tiny_classifier):
  """What --zo-buckets relies on: the loss of a batch cut to its longest sentence
  equals the padded batch's (padding is masked in attention and pooling)."""
  from picpq_jax.finetune.run import classifier_loss
  from picpq_jax.finetune.text import trim_to_bucket
  model, params, data = tiny_classifier
  batch = _batch(data, np.array([1, 3]))  # "good", "bad bad": 3 and 4 tokens of 7
  cut = trim_to_bucket(batch, (4,))
  assert batch["input_ids"].shape[1] > 4 and cut["input_ids"].shape[1] == 4
  loss = jax.jit(classifier_loss(model), static_argnums=2)
  np.testing.assert_allclose(float(loss(params, cut, None)), float(loss(params, batch, None)),
                             rtol=1e-6)
