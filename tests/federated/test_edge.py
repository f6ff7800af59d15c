"""The PIC-PQ-compressed client (``--client-from``) and ``--init-from``: loading a compress
workdir, the exact split of the compressed model, and its edge cost and traffic against
hand-worked numbers."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from picpq_jax import models
from picpq_jax.errors import UserError
from picpq_jax.federated import FederatedConfig
from picpq_jax.federated import edge as fedge
from picpq_jax.federated.split import split_model
from picpq_jax.train.checkpoint import Checkpoints
from tests.federated.conftest import random_variables

# A ResNet-8 plan: stage1 (the smashed data at cut 1) keeps 10 of 16 channels, the
# block's inner group 8 of 16; stage2 loses 2 channels on the server side.
KEPT_STAGE1 = [0, 1, 2, 4, 5, 7, 9, 11, 12, 14]
KEPT_MID = [0, 2, 3, 5, 8, 9, 13, 15]
BITS = {"stem_conv": 32, "stage1_block0/conv1": 8, "stage1_block0/conv2": 6,
        "stage2_block0/conv1": 4, "stage2_block0/conv2": 4, "stage3_block0/conv1": 4,
        "stage3_block0/conv2": 4, "head": 32}
META = {"config": {"arch": "resnet8", "data": "embedded", "val_size": 16, "seed": 0},
        "class_names": [f"c{i}" for i in range(10)],
        "normalization": {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}}


def _mask(size, kept):
  m = np.zeros(size, np.float32)
  m[kept] = 1.0
  return m


def _plan_arrays():
  masks = {"stage1": _mask(16, KEPT_STAGE1), "stage1_block0_mid": _mask(16, KEPT_MID),
           "stage2": _mask(32, list(range(2, 32))), "stage2_block0_mid": np.ones(32, np.float32),
           "stage3": np.ones(64, np.float32), "stage3_block0_mid": np.ones(64, np.float32)}
  flat = {f"masks/{g}": m for g, m in masks.items()}
  for layer, bits in BITS.items():
    flat[f"quant/{layer}/w_bits"] = np.asarray(bits, np.int32)
    flat[f"quant/{layer}/a_bits"] = np.asarray(bits, np.int32)
  return flat


@functools.cache
def _base_variables():
  return random_variables(models.get_model("resnet8"), (32, 32, 3), seed=0)


def _save_train_run(path, variables, meta):
  """A `picpq train` workdir as load_variables reads it: checkpoints/<step>/{state,meta}."""
  ckpt = Checkpoints(os.path.join(path, "checkpoints"))
  ckpt.save(7, variables, meta, force=True)
  ckpt.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A compress workdir that finished its plan stage (no fine-tuning yet)."""
  root = tmp_path_factory.mktemp("compress")
  _save_train_run(str(root / "base"), _base_variables(), META)
  work = root / "pic"
  work.mkdir()
  (work / "config.json").write_text(json.dumps({"checkpoint": str(root / "base"),
                                                "quantizer": "dorefa"}))
  np.savez(work / "plan.npz", **_plan_arrays())
  return str(work)


def test_compressed_start_is_the_plan_with_pruned_weights_zeroed(workdir):
  start = fedge.load_compressed(workdir, "resnet8", 10)
  assert "step 7, pruned weights zeroed" in start.info["weights"]
  assert start.info["quantizer"] == "dorefa"
  assert type(start.quantizer).__name__ == "DoReFa"
  plan = _plan_arrays()
  flat = traverse_util.flatten_dict({"masks": start.variables["masks"],
                                     "quant": start.variables["quant"]}, sep="/")
  assert set(flat) == set(plan)
  for k, v in plan.items():
    np.testing.assert_array_equal(np.asarray(flat[k]), v)
  base = _base_variables()["params"]["stage1_block0"]["conv1"]["kernel"]
  got = np.asarray(start.variables["params"]["stage1_block0"]["conv1"]["kernel"])
  # conv1 reads stage1 and writes the mid group: a weight survives iff both are kept.
  keep = _mask(16, KEPT_STAGE1)[:, None] * _mask(16, KEPT_MID)[None, :]
  np.testing.assert_array_equal(got, np.asarray(base) * keep)


def test_compressed_split_is_exact_and_quantized(workdir):
  start = fedge.load_compressed(workdir, "resnet8", 10)
  model = models.get_model("resnet8", quantizer=start.quantizer)
  sm = split_model(model, 1)
  cv, sv = sm.split(start.variables)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
  smashed = sm.client.apply(cv, x)
  pruned = [c for c in range(16) if c not in KEPT_STAGE1]
  assert not np.any(np.asarray(smashed)[..., pruned]) and np.all(
      np.asarray(smashed)[..., KEPT_STAGE1].any(axis=(0, 1, 2)))
  np.testing.assert_array_equal(np.asarray(sm.server.apply(sv, smashed)),
                                np.asarray(model.apply(start.variables, x)))
  # The client runs at its bits: at 32 bits everywhere its output differs.
  full_quant = jax.tree.map(lambda b: jnp.full_like(b, 32), cv["quant"])
  assert float(jnp.max(jnp.abs(sm.client.apply({**cv, "quant": full_quant}, x) - smashed))) > 1e-3


def test_edge_cost_against_hand_counts(workdir):
  start = fedge.load_compressed(workdir, "resnet8", 10)
  model = models.get_model("resnet8", quantizer=start.quantizer)
  e = fedge.edge_cost(split_model(model, 1), models.model_structure(model, (32, 32, 3)),
                      start.variables)
  # Client at cut 1: stem 3->16 and stage1_block0 conv1 16->16, conv2 16->16, all 3x3 at
  # 32x32 (1024 outputs per channel); compressed 3->10, 10->8, 8->10.
  stem, conv1, conv2 = 1024 * 9 * 3 * 10, 1024 * 9 * 10 * 8, 1024 * 9 * 8 * 10
  assert e["client"] == {"flops": stem + conv1 + conv2,
                         "params": 27 * 10 + 90 * 8 + 72 * 10,
                         "bops": stem * 32 * 32 + conv1 * 8 * 8 + conv2 * 6 * 6}
  full = 1024 * 9 * 3 * 16 + 2 * 1024 * 9 * 16 * 16
  assert e["client_full"] == {"flops": full, "params": 27 * 16 + 2 * 144 * 16,
                              "bops": full * 32 * 32}
  assert e["smashed_shape"] == [32, 32, 16] and e["smashed_channels_sent"] == 10
  assert e["smashed_values"] == 1024 * 10 and e["smashed_values_full"] == 1024 * 16
  # Exchanged each round: kernels of kept channels, and per kept BN channel scale, bias,
  # mean and variance (4 float32); stem BN 10, bn1 8, bn2 10.
  assert e["client_model_bytes"] == 4 * (270 + 720 + 720 + 4 * (10 + 8 + 10))
  assert e["client_model_bytes_full"] == 4 * (432 + 2304 + 2304 + 4 * (16 + 16 + 16))


def test_bad_sources_are_user_errors(workdir, tmp_path):
  with pytest.raises(UserError, match="no plan.npz"):
    os.makedirs(tmp_path / "early")
    (tmp_path / "early" / "config.json").write_text("{}")
    fedge.load_compressed(str(tmp_path / "early"), "resnet8", 10)
  with pytest.raises(UserError, match="not a `picpq compress` workdir"):
    fedge.load_compressed(str(tmp_path), "resnet8", 10)
  with pytest.raises(UserError, match="no finetune/ checkpoint yet"):
    fedge.load_compressed(workdir, "resnet8", 10, weights="finetune")
  with pytest.raises(UserError, match="holds a resnet8 model, not --arch resnet20"):
    fedge.load_compressed(workdir, "resnet20", 10)
  with pytest.raises(UserError, match="has 10 classes but --data has 3"):
    fedge.load_start(json.loads(open(os.path.join(workdir, "config.json")).read())["checkpoint"],
                     "resnet8", 3)
  with pytest.raises(UserError, match="--methods must be split methods"):
    FederatedConfig(client_from=workdir, methods="splitfed,fedavg")
  with pytest.raises(UserError, match="pass one"):
    FederatedConfig(client_from=workdir, init_from=workdir, methods="splitfed")
  assert FederatedConfig(client_from=workdir, methods="splitfed",
                         smashed_bits=4).run_name("splitfed") == "splitfed-picpq-4bit"


def test_init_from_loads_the_saved_variables(workdir):
  base = json.loads(open(os.path.join(workdir, "config.json")).read())["checkpoint"]
  start = fedge.load_start(base, "resnet8", 10)
  for a, b in zip(jax.tree.leaves(start.variables), jax.tree.leaves(_base_variables())):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert start.info["weights"] == "step 7" and start.meta["config"]["arch"] == "resnet8"


RUN = """
import json, os
import numpy as np
from picpq_jax.errors import UserError
from picpq_jax.federated import FederatedConfig, run_federated

work, client_from, cache = WORK, CLIENT_FROM, CACHE
common = dict(arch="resnet8", data="embedded", cache_dir=cache, val_size=16, train_size=32,
              clients=2, rounds=1, local_steps=2, batch_size=4, progress=False, plot=False,
              methods="splitfed", client_from=client_from)
try:
  run_federated(FederatedConfig(workdir=f"{work}/x", **{**common, "val_size": 20}),
                print_fn=lambda *a: None)
  raise AssertionError("another validation split must be refused")
except UserError as e:
  assert "--val-size 16 --seed 0" in str(e), e
out = run_federated(FederatedConfig(workdir=f"{work}/a", smashed_bits=4, **common),
                    print_fn=lambda *a: None)
run = out["runs"]["splitfed-picpq-4bit"]
assert run["label"] == "SplitFed-V1 (PIC-PQ client)", run["label"]
rec = [json.loads(l) for l in open(f"{work}/a/splitfed-picpq-4bit/metrics.jsonl")]
# 2 participants x 2 steps; 4-bit smashed data of the 10 kept channels of [4, 32, 32, 16].
msg = -(-4 * 32 * 32 * 10 * 4 // 8) + 8
assert rec[0]["up"]["smashed"] == rec[0]["down"]["gradients"] == 4 * msg, rec[0]
model = 4 * (270 + 720 + 720 + 4 * 28)
assert rec[0]["up"]["client_model"] == rec[0]["down"]["client_model"] == 2 * model
assert rec[0]["fp32_total_bytes"] - rec[0]["total_bytes"] == 2 * 4 * (4 * 32 * 32 * 10 * 4 - msg)
assert out["edge"]["smashed_channels_sent"] == 10 and "client_from" in out["start"]
assert np.isfinite(rec[0]["val_loss"])
report = open(f"{work}/a/report.md").read()
assert "Edge cost of the client part" in report and "| smashed channels sent | 16 (32x32x16) | 10 | 1.60x |" in report
print("OK")
"""


def test_federated_run_with_a_compressed_client(on_devices, workdir, tmp_path, cache_dir):
  on_devices(RUN.replace("WORK", repr(str(tmp_path))).replace("CLIENT_FROM", repr(workdir))
             .replace("CACHE", repr(cache_dir)), devices=2)
