"""The cut is exact for every architecture: the parts tile the model's variables, compose
to its function, and train like it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax import models
from picpq_jax.errors import UserError
from picpq_jax.federated import FederatedConfig
from picpq_jax.federated import split as fsplit
from picpq_jax.federated import steps as fsteps
from picpq_jax.train import create_train_state, sgd_nesterov, train_step
from tests.federated.conftest import random_variables

# Smashed data per example at each cut, worked out by hand from the architectures
# (strides, pools and widths), not read from the code.
SMASHED = {
    "resnet8": ((32, 32, 3), {0: (32, 32, 16), 1: (32, 32, 16), 2: (16, 16, 32),
                              3: (8, 8, 64)}),
    "vgg16": ((32, 32, 3), {1: (16, 16, 64), 2: (8, 8, 128), 3: (4, 4, 256), 4: (2, 2, 512),
                            5: (1, 1, 512)}),
    "mobilenetv2": ((32, 32, 3), {0: (32, 32, 32), 1: (32, 32, 16), 2: (32, 32, 24),
                                  3: (16, 16, 32), 4: (8, 8, 64), 5: (8, 8, 96),
                                  6: (4, 4, 160), 7: (4, 4, 320)}),
    # 64x64 input: stem stride 2 and max-pool stride 2, then stages at strides 1, 2, 2, 2.
    "resnet18": ((64, 64, 3), {0: (16, 16, 64), 1: (16, 16, 64), 2: (8, 8, 128),
                               3: (4, 4, 256), 4: (2, 2, 512)}),
}
SMASHED_GROUP = {"resnet8": {0: "stage1", 1: "stage1", 2: "stage2", 3: "stage3"},
                 "vgg16": {1: "conv2", 2: "conv4", 3: "conv7", 4: "conv10", 5: "conv13"},
                 "mobilenetv2": {0: "stem", **{k: f"stage{k}" for k in range(1, 8)}},
                 "resnet18": {0: "stage1", 1: "stage1", 2: "stage2", 3: "stage3", 4: "stage4"}}


@functools.cache
def _setup(arch, cut):
  """Random variables (NumPy draws: ``init`` is slow on a small CPU) with channel 3 of
  the smashed data's group pruned, an input batch, and the whole model's logits
  (eager: op by op, so they are computed exactly as the parts compute them)."""
  model = models.get_model(arch)
  shape = SMASHED[arch][0]
  variables = random_variables(model, shape, seed=0)
  group = SMASHED_GROUP[arch][cut]
  variables["masks"] = {**variables["masks"],
                        group: variables["masks"][group].at[3].set(0.0)}
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *shape)), jnp.float32)
  return model, variables, x, model.apply(variables, x)


@pytest.mark.parametrize("arch,cut", [(a, k) for a in SMASHED for k in SMASHED[a][1]])
def test_parts_tile_the_model_and_compose_to_its_logits(arch, cut):
  model, variables, x, logits = _setup(arch, cut)
  sm = fsplit.split_model(model, cut, input_shape=SMASHED[arch][0])
  assert sm.smashed_group == SMASHED_GROUP[arch][cut]
  cv, sv = sm.split(variables)
  merged = sm.merge(cv, sv)
  assert jax.tree.structure(merged) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(variables)):
    assert a is b
  assert set(cv["params"]).isdisjoint(sv["params"])
  assert set(cv["params"]) | set(sv["params"]) == set(variables["params"])
  smashed = sm.client.apply(cv, x)
  assert smashed.shape == (2, *SMASHED[arch][1][cut])
  assert not np.any(np.asarray(smashed)[..., 3])  # the pruned channel carries nothing
  np.testing.assert_array_equal(np.asarray(sm.server.apply(sv, smashed)), np.asarray(logits))


def test_bad_cuts_are_user_errors_that_list_the_valid_ones():
  with pytest.raises(UserError, match=r"--cut=0 is not a cut point of vgg16: use 1 \(after "
                                      r"group1\), .*5 \(after group5\)"):
    fsplit.split_model("vgg16", 0)
  with pytest.raises(UserError, match=r"--cut=4 .* resnet8: use 0 \(after stem\), 1 .*3 "):
    fsplit.split_model("resnet8", 4)
  with pytest.raises(UserError, match=r"--cut=8 .* mobilenetv2: .*7 \(after stage7\)$"):
    FederatedConfig(arch="mobilenetv2", cut=8)
  assert list(fsplit.valid_cuts(models.get_model("resnet18"))) == [0, 1, 2, 3, 4]
  FederatedConfig(arch="vgg16", cut=0, methods="fedavg")  # no split: any cut is ignored


def _merged_state(sm, parts):
  return sm.merge({"params": parts["client"].params, "batch_stats": parts["client"].batch_stats},
                  {"params": parts["server"].params, "batch_stats": parts["server"].batch_stats})


# Compiling a training step of the full-depth VGG-16 or MobileNetV2 takes minutes on a
# small CPU, so the training checks use the same classes (the same span code) with
# fewer, narrower layers at 16x16; the forward test above covers the full depths.
SMALL = {
    "resnet8": models.get_model("resnet8"),
    "vgg": models.CifarVGG(cfg=(8, "M", 16, 16, "M", 16), hidden=16),
    "mobilenetv2": models.MobileNetV2(cfg=((1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 1, 2)),
                                      stem_features=16, last_features=32),
}


@pytest.mark.parametrize("arch,cut,group,shape", [
    ("resnet8", 1, "stage1", (32, 32, 3)),
    ("vgg", 2, "conv3", (16, 16, 3)),
    # At cut 0 the stem group spans the cut: the server's first depthwise conv writes it.
    ("mobilenetv2", 0, "stem", (16, 16, 3)),
])
def test_split_training_equals_whole_model_training(arch, cut, group, shape):
  """Three split steps (one client, float32 messages) equal three steps of the whole
  model with the library's own train step, with a pruned channel at the cut."""
  model = SMALL[arch]
  rng = np.random.default_rng(1)
  variables = random_variables(model, shape, seed=1)
  variables["masks"][group] = variables["masks"][group].at[1].set(0.0)
  xs = jnp.asarray(rng.normal(size=(3, 4, *shape)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=(3, 4)), jnp.int32)
  lr = 0.05
  ref = create_train_state(variables, sgd_nesterov(lr))
  ref_step = jax.jit(functools.partial(train_step, model=model, tx=sgd_nesterov(lr)))
  sm = fsplit.split_model(model, cut, input_shape=shape)
  tx = sgd_nesterov(1.0)
  cv, sv = sm.split(variables)
  parts = {"client": fsteps.PartState.create(cv, tx), "server": fsteps.PartState.create(sv, tx)}
  consts = {"client": fsteps.constants(cv), "server": fsteps.constants(sv)}
  step = jax.jit(functools.partial(fsteps.split_step, sm, tx))
  for t in range(3):
    ref, _ = ref_step(ref, xs[t], labels[t])
    parts, metrics = step(parts, consts, xs[t], labels[t], jnp.float32(lr), jnp.int32(32))
  merged = _merged_state(sm, parts)
  for a, b in zip(jax.tree.leaves((merged["params"], merged["batch_stats"])),
                  jax.tree.leaves((ref.params, ref.batch_stats))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  assert float(metrics["count"]) == 4.0
  if arch == "resnet8":  # 4-bit smashed data changes the step, but only a little
    out4, _ = step(parts, consts, xs[0], labels[0], jnp.float32(lr), jnp.int32(4))
    out32, _ = step(parts, consts, xs[0], labels[0], jnp.float32(lr), jnp.int32(32))
    d = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), out4["client"].params,
                     out32["client"].params)
    assert 0 < max(jax.tree.leaves(d)) < 0.05


def test_a_compacted_resnet_splits_exactly():
  """Narrowed groups and index shortcuts (what compaction produces) route through the cut."""
  model = models.CifarResNet(
      depth=8, group_sizes=(("stage1_block0_mid", 8), ("stage2", 24), ("stage2_block0_mid", 5)),
      shortcut_maps=(tuple(range(16)) + (-1,) * 8, tuple(range(24)) + (-1,) * 40))
  variables = random_variables(model, (32, 32, 3), seed=1)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  for cut in (1, 2):
    sm = fsplit.split_model(model, cut)
    cv, sv = sm.split(variables)
    np.testing.assert_array_equal(np.asarray(sm.server.apply(sv, sm.client.apply(cv, x))),
                                  np.asarray(model.apply(variables, x)))
