"""The training loop: resume reaches the same result as an uninterrupted run,
metrics are JSON lines, and finished work is protected."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from picpq_jax.errors import UserError
from picpq_jax.train import Checkpoints, TrainConfig, read_jsonl, train_and_evaluate


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  """96 random 32x32 RGB PNGs in train/<class>/ (3 classes), a real image folder."""
  root = tmp_path_factory.mktemp("tiny")
  rng = np.random.default_rng(0)
  for c in range(3):
    os.makedirs(root / "train" / f"class{c}")
    for i in range(32):
      pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
      pixels[..., c] = 255 - (i % 8)  # a class signal in one channel
      Image.fromarray(pixels).save(root / "train" / f"class{c}" / f"{i:03d}.png")
  return str(root)


def _config(folder, workdir, cache_dir, **kw):
  defaults = dict(arch="resnet8", data=folder, workdir=str(workdir), val_size=16, epochs=2,
                  batch_size=16, lr=0.05, checkpoint_every=2, progress=False,
                  cache_dir=cache_dir)
  return TrainConfig(**{**defaults, **kw})


def _restore_params(workdir):
  ckpts = Checkpoints(os.path.join(workdir, "checkpoints"))
  step = ckpts.latest_step()
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(path)
  return step, state["params"]


def test_resume_after_interruption_matches_uninterrupted_run(tiny_folder, tmp_path, cache_dir):
  full = train_and_evaluate(_config(tiny_folder, tmp_path / "full", cache_dir), print_fn=lambda s: None)
  assert full["steps"] == 10 and full["finished"]

  part = train_and_evaluate(_config(tiny_folder, tmp_path / "split", cache_dir),
                            stop_at_step=3, print_fn=lambda s: None)
  assert part["steps"] == 3 and not part["finished"]
  resumed = train_and_evaluate(_config(tiny_folder, tmp_path / "split", cache_dir, resume=True),
                               print_fn=lambda s: None)
  assert resumed["steps"] == 10

  step_a, params_a = _restore_params(tmp_path / "full")
  step_b, params_b = _restore_params(tmp_path / "split")
  assert step_a == step_b == 10
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  assert resumed["val_loss"] == full["val_loss"]

  # The metrics of the resumed run read like one run: same records, no duplicates.
  def records(name):
    return [(r["step"], sorted(r)) for r in read_jsonl(tmp_path / name / "metrics.jsonl")]
  assert records("full") == records("split")
  vals = [r for r in read_jsonl(tmp_path / "full" / "metrics.jsonl") if "val_accuracy" in r]
  assert [r["epoch"] for r in vals] == [1, 2]
  saved = json.loads((tmp_path / "full" / "results.json").read_text())
  assert saved["val_accuracy"] == full["val_accuracy"]


def test_existing_checkpoint_is_not_overwritten_without_resume(tiny_folder, tmp_path, cache_dir):
  config = _config(tiny_folder, tmp_path / "run", cache_dir, epochs=1)
  train_and_evaluate(config, print_fn=lambda s: None)
  before = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
  with pytest.raises(UserError, match="--resume"):
    train_and_evaluate(config, print_fn=lambda s: None)
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == before


def test_resume_with_a_different_recipe_is_refused(tiny_folder, tmp_path, cache_dir):
  train_and_evaluate(_config(tiny_folder, tmp_path / "run", cache_dir, epochs=1),
                     stop_at_step=2, print_fn=lambda s: None)
  with pytest.raises(UserError, match="--lr"):
    train_and_evaluate(_config(tiny_folder, tmp_path / "run", cache_dir, epochs=1, lr=0.2,
                               resume=True), print_fn=lambda s: None)


def test_training_from_given_variables_leaves_the_callers_arrays_alive(tiny_folder, tmp_path,
                                                                       cache_dir):
  from picpq_jax import models
  model = models.get_model("resnet8", num_classes=3)
  variables = models.init_variables(model, jax.random.key(1), (32, 32, 3))
  mask = variables["masks"]["stage1"]
  train_and_evaluate(_config(tiny_folder, tmp_path / "run", cache_dir, epochs=1),
                     variables=variables, stop_at_step=2, print_fn=lambda s: None)
  np.testing.assert_array_equal(np.asarray(mask), np.ones(16))  # not donated away


def test_conv_inputs_option_reaches_the_train_step(tiny_folder, tmp_path, cache_dir, monkeypatch):
  # The switch's numerics are tested in test_steps_conv_inputs.py; here: the option
  # is validated and handed to the step the loop runs.
  from picpq_jax.train import loop
  seen = []

  def spy(*args, **kwargs):
    seen.append(kwargs.get("conv_inputs"))
    return jit_train_step(*args, **kwargs)

  jit_train_step = loop.jit_train_step
  monkeypatch.setattr(loop, "jit_train_step", spy)
  result = train_and_evaluate(_config(tiny_folder, tmp_path / "m", cache_dir, epochs=1,
                                      conv_inputs="materialized"), print_fn=lambda s: None)
  assert seen == ["materialized"] and result["finished"]
  assert np.isfinite(result["val_loss"])
  with pytest.raises(UserError, match="--conv-inputs='stored'.*fused or materialized"):
    _config(tiny_folder, tmp_path / "bad", cache_dir, conv_inputs="stored")


def test_bfloat16_dtype_trains_and_keeps_float32_parameters(tiny_folder, tmp_path, cache_dir):
  # The products' dtype and numerics are tested in tests/models/test_model_dtype.py;
  # here: the option is validated, reaches the model, and checkpoints stay float32.
  result = train_and_evaluate(_config(tiny_folder, tmp_path / "bf16", cache_dir, epochs=1,
                                      dtype="bfloat16"), print_fn=lambda s: None)
  assert result["finished"] and np.isfinite(result["val_loss"])
  _, params = _restore_params(str(tmp_path / "bf16"))
  assert {np.asarray(p).dtype for p in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  with pytest.raises(UserError, match="--dtype='float16'.*float32 or bfloat16"):
    _config(tiny_folder, tmp_path / "bad", cache_dir, dtype="float16")
