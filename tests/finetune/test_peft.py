"""BitFit, full fine-tuning, prompt tuning, the partition helpers and the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from picpq_jax.errors import UserError
from picpq_jax.finetune import memory, peft
from tests.finetune.toy import HIDDEN, Toy, toy_batch, toy_loss, toy_params

BIASES = {"attention/query/bias", "attention/key/bias", "attention/value/bias",
          "attention/output/bias", "mlp/intermediate/bias", "mlp/output/bias", "norm/bias",
          "head/bias"}


def _flat_np(tree):
  return {k: np.array(v) for k, v in peft.flatten(tree).items()}


def test_bitfit_mask_selects_exactly_the_biases_and_the_head():
  params = toy_params()
  mask = peft.flatten(peft.bitfit_mask(params))
  assert {p for p, m in mask.items() if m} == BIASES
  assert len(mask) == 17  # every leaf has an entry (7 Dense x 2, LayerNorm x 2, table)
  mask = peft.flatten(peft.bitfit_mask(params, also="^head/"))
  assert {p for p, m in mask.items() if m} == BIASES | {"head/kernel"}
  with pytest.raises(UserError, match="matches none"):
    peft.bitfit_mask(params, also="classifier")


def test_partition_and_merge_round_trip_and_counts():
  params = toy_params()
  frozen, trainable = peft.bitfit("head").init(None, params)
  assert set(peft.flatten(trainable)) == BIASES | {"head/kernel"}
  assert not set(peft.flatten(frozen)) & set(peft.flatten(trainable))
  back = peft.flatten(peft.merge(frozen, trainable))
  flat = peft.flatten(params)
  assert set(back) == set(flat)
  for p, x in back.items():
    np.testing.assert_array_equal(x, flat[p])
  # hand counts: 4 attention biases of 8, mlp 16 + 8, LayerNorm bias 8, head 3 + 8*3
  assert peft.trainable_count(trainable) == 4 * 8 + 16 + 8 + 8 + 3 + 24
  assert peft.trainable_count(params) == 11 * 8 + 4 * (64 + 8) + (128 + 16) + (128 + 8) + 16 + 27


@pytest.mark.parametrize("name", ["bitfit", "full"])
def test_train_step_updates_only_the_trainable_part(name):
  params, batch = toy_params(), toy_batch()
  before = _flat_np(params)
  method = peft.bitfit("head") if name == "bitfit" else peft.full()
  frozen, trainable = method.init(None, params)
  train = peft.make_train_step(toy_loss, optax.adam(1e-2), method)
  state = train.init(trainable)
  count = peft.trainable_count(trainable)
  assert sum(x.size for x in jax.tree.leaves(state)) == 2 * count + 1
  losses = []
  for i in range(4):
    trainable, state, loss, _ = train.step(frozen, trainable, state, batch, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  after = peft.flatten(peft.merge(frozen, trainable))
  changed = {p for p, x in after.items() if np.abs(np.asarray(x) - before[p]).max() > 0}
  assert changed == (set(before) if name == "full" else BIASES | {"head/kernel"})
  for p, x in _flat_np(params).items():
    np.testing.assert_array_equal(x, before[p])  # init copied: donation spared params


def test_bitfit_mask_with_optax_multi_transform_freezes_the_rest():
  params, batch = toy_params(), toy_batch()
  mask = peft.bitfit_mask(params)
  tx = optax.multi_transform({True: optax.adam(0.1), False: optax.set_to_zero()}, mask)
  state = tx.init(params)
  # Adam state exists for the biases only
  assert sum(x.size for x in jax.tree.leaves(state)) == 2 * (4 * 8 + 16 + 8 + 8 + 3) + 1
  updates, _ = tx.update(jax.jit(jax.grad(toy_loss))(params, batch), state, params)
  moved = {p for p, u in peft.flatten(updates).items() if np.abs(np.asarray(u)).max() > 0}
  assert moved == BIASES


def test_prompt_from_tokens_and_random_prompt():
  params = toy_params()
  ids = [3, 0, 7]
  table = np.asarray(params["word_embeddings"]["embedding"])
  np.testing.assert_array_equal(peft.prompt_from_tokens(params, ids), table[ids])
  frozen, soft = peft.prompt(length=4, scale=0.25).init(jax.random.key(0), params)
  assert soft.shape == (4, HIDDEN) and np.all(np.abs(soft) <= 0.25)
  assert frozen is params
  with pytest.raises(UserError, match="in \\[0, 11\\)"):
    peft.prompt_from_tokens(params, [11])
  with pytest.raises(UserError, match="matches none"):
    peft.prompt(3, embedding="tok_embed").init(jax.random.key(0), params)


def test_prompt_tuning_trains_the_prompt_and_feeds_it_to_the_model():
  params, batch = toy_params(), toy_batch()
  before = _flat_np(params)
  method = peft.prompt(init_ids=[1, 2, 3])
  frozen, soft = method.init(jax.random.key(0), params)
  p0, extras = method.combine(frozen, soft, None)
  assert set(extras) == {"prompt"}
  forward = jax.jit(Toy().apply)  # the combined inputs are what the model gets
  np.testing.assert_allclose(forward({"params": p0}, batch["x"], **extras),
                             forward({"params": params}, batch["x"], soft), rtol=1e-6)
  start = np.array(soft)
  train = peft.make_train_step(toy_loss, optax.adam(5e-2), method)
  state = train.init(soft)
  losses = []
  for i in range(5):
    soft, state, loss, _ = train.step(frozen, soft, state, batch, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < losses[0] and np.abs(np.asarray(soft) - start).max() > 0
  for p, x in _flat_np(frozen).items():
    np.testing.assert_array_equal(x, before[p])


def test_remat_gives_the_same_step_and_aux_is_returned():
  params, batch = toy_params(), toy_batch()

  def loss_aux(p, b, key):
    loss = toy_loss(p, b, key)
    return loss, {"twice": 2 * loss}

  results = []
  for remat in (False, True):  # (a checkpoint policy: in test_qlora)
    method = peft.bitfit()
    frozen, trainable = method.init(None, params)
    train = peft.make_train_step(loss_aux, optax.sgd(0.1), method, has_aux=True, remat=remat)
    trainable, _, loss, aux = train.step(frozen, trainable, train.init(trainable), batch,
                                         jax.random.key(0))
    np.testing.assert_allclose(aux["twice"], 2 * loss, rtol=1e-6)
    results.append(jax.tree.leaves(trainable))
  for other in results[1:]:
    for x, y in zip(results[0], other):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_only_freezes_everything_but_the_matching_leaves():
  params = toy_params()
  frozen, trainable = peft.only("^head/", "head").init(None, params)
  assert set(peft.flatten(trainable)) == {"head/kernel", "head/bias"}
  assert peft.trainable_count(trainable) == 8 * 3 + 3  # toy head: kernel [8, 3], bias [3]
  merged, extras = peft.only("^head/").combine(frozen, trainable)
  assert extras == {} and set(peft.flatten(merged)) == set(peft.flatten(params))
  for p, x in peft.flatten(merged).items():
    np.testing.assert_array_equal(x, peft.flatten(params)[p])
  with pytest.raises(UserError, match="head pattern 'classifier' matches none"):
    peft.only("classifier", "head").init(None, params)


def test_train_also_requires_a_match():
  with pytest.raises(UserError, match="--train-also pattern 'classifier' matches none"):
    peft.train_also(peft.prompt(2), "classifier").init(jax.random.key(0), toy_params())
  assert peft.train_also(peft.full(), None).name == "full"


def test_compiled_memory_reads_the_buffer_assignment():
  x = jax.ShapeDtypeStruct((1000,), jnp.float32)
  stats = memory.compiled_memory(lambda a, b: a * 2 + b, x, x)
  assert stats["argument_bytes"] == 8000 and stats["output_bytes"] == 4000
  assert stats["peak_bytes"] == (stats["argument_bytes"] + stats["output_bytes"]
                                 + stats["temp_bytes"] - stats["alias_bytes"])
  donated = memory.compiled_memory(jax.jit(lambda a: a + 1, donate_argnums=0), x)
  assert donated["alias_bytes"] == 4000  # the output reuses the donated buffer
  assert memory.peak_rss_bytes() > 2 ** 20


def test_methods_are_exported_from_the_package():
  import picpq_jax.finetune as ft  # pylint: disable=import-outside-toplevel
  for name in ("Method", "TrainStep", "make_train_step", "full", "bitfit", "bitfit_mask",
               "prompt", "train_also", "trainable_count", "QuantizedTensor", "MezoStep",
               "fedit_round", "zo_round", "fedit_traffic", "zo_traffic", "compiled_memory",
               "memory_of", "peak_rss_bytes"):
    assert hasattr(ft, name), name
  assert ft.lora.method("query").name == "lora" and ft.qlora.method().name == "qlora"
