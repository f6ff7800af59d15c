"""The training loop: resume reaches the same result as an uninterrupted run,
metrics are JSON lines, and finished work is protected."""

import json
import os
import signal
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from picpq_jax import cli
from picpq_jax.engine import load_trained
from picpq_jax.errors import UserError
from picpq_jax.train import Checkpoints, TrainConfig, read_jsonl, train_and_evaluate
from tests.engine.harness import interrupt_after_first_checkpoint, tree_files


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
  trained = load_trained(workdir)
  return trained.step, trained.variables["params"]


def _argv(folder, cache_dir, workdir, *extra):
  return ["train", "--arch", "resnet8", "--data", folder, "--val-size", "16", "--epochs", "2",
          "--batch-size", "16", "--lr", "0.05", "--checkpoint-every", "1", "--no-progress",
          "--cache-dir", cache_dir, "--workdir", str(workdir), *extra]


def test_sigterm_sigkill_resume_and_resume_options(tiny_folder, tmp_path, cache_dir, capsys):
  """SIGTERM and SIGKILL after a checkpoint, then --resume: the final parameters and
  metrics equal an uninterrupted run's; a changed must-match option is refused (one
  line, exit 2, nothing written); more epochs (may change) continues."""
  assert cli.main(_argv(tiny_folder, cache_dir, tmp_path / "full")) == 0
  work = tmp_path / "split"
  command = [sys.executable, "-m", "picpq_jax.cli", *_argv(tiny_folder, cache_dir, work)]
  term = interrupt_after_first_checkpoint(command, str(work / "checkpoints"), signal.SIGTERM)
  lines = term.stderr.strip().splitlines()
  assert term.returncode == 143 and len(lines) == 1 and "SIGTERM: stopped after step" in lines[0]
  stopped = Checkpoints(str(work / "checkpoints")).latest_step()
  kill = interrupt_after_first_checkpoint([*command, "--resume"], str(work / "checkpoints"),
                                          signal.SIGKILL, after=stopped)
  assert kill.returncode == -signal.SIGKILL
  capsys.readouterr()
  before = tree_files(work)
  assert cli.main(_argv(tiny_folder, cache_dir, work, "--resume", "--lr", "0.2")) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "made with --lr=0.05, not 0.2: pass --lr 0.05" in err[0], err
  assert tree_files(work) == before
  assert cli.main(_argv(tiny_folder, cache_dir, work, "--resume")) == 0

  step_a, params_a = _restore_params(tmp_path / "full")
  step_b, params_b = _restore_params(work)
  assert step_a == step_b == 10
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  assert read_jsonl(tmp_path / "full" / "metrics.jsonl") == read_jsonl(work / "metrics.jsonl")
  full, resumed = (json.loads((p / "results.json").read_text()) for p in (tmp_path / "full", work))
  assert resumed["val_loss"] == full["val_loss"] and resumed["steps"] == 10
  vals = [r for r in read_jsonl(work / "metrics.jsonl") if "val_accuracy" in r]
  assert [r["epoch"] for r in vals] == [1, 2]

  assert cli.main(_argv(tiny_folder, cache_dir, work, "--resume", "--epochs", "3")) == 0
  assert json.loads((work / "results.json").read_text())["steps"] == 15


def test_existing_checkpoint_is_not_overwritten_without_resume(tiny_folder, tmp_path, cache_dir):
  config = _config(tiny_folder, tmp_path / "run", cache_dir, epochs=1)
  train_and_evaluate(config, print_fn=lambda s: None)
  before = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
  with pytest.raises(UserError, match="--resume"):
    train_and_evaluate(config, print_fn=lambda s: None)
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == before


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
