"""Checkpoints prove their contents: each damage of the newest one (issue 14's list) is
named in one line and the previous intact checkpoint is used; never NaN state."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from picpq_jax.engine import Checkpoints, load_trained, tree_digest
from picpq_jax.errors import UserError
from tests.engine import harness as damage


def _state(value: float) -> dict:
  """Random weights (incompressible, so the data file holds them) plus ``value``."""
  w = np.random.default_rng(int(value) if np.isfinite(value) else 9).normal(size=(64, 64))
  return {"params": {"w": jnp.asarray(w + value, jnp.float32), "b": jnp.arange(8.0)},
          "step": jnp.int32(value if np.isfinite(value) else 0)}


def _two_checkpoints(directory) -> Checkpoints:
  ckpt = Checkpoints(directory)
  ckpt.save(1, _state(1.0), {"note": "first"}, force=True)
  ckpt.save(2, _state(2.0), {"note": "second"}, force=True)
  return ckpt


@pytest.mark.parametrize("template", [True, False], ids=["template", "as_saved"])
@pytest.mark.parametrize("damage_fn", damage.DAMAGES, ids=lambda f: f.__name__)
def test_damaged_newest_checkpoint_gives_way_to_the_previous(damage_fn, template, tmp_path):
  _two_checkpoints(tmp_path / "checkpoints").close()
  damage_fn(str(tmp_path / "checkpoints" / "2"))
  lines = []
  state, meta, step = Checkpoints(tmp_path / "checkpoints").restore_newest(
      _state(0.0) if template else None, lines.append)
  if step == 2:  # only what orbax does not need was hit (_METADATA, given a template)
    assert damage_fn is damage.delete_metadata and template and not lines
    np.testing.assert_array_equal(state["params"]["w"], _state(2.0)["params"]["w"])
    return
  assert step == 1 and meta["note"] == "first"
  np.testing.assert_array_equal(state["params"]["w"], _state(1.0)["params"]["w"])
  assert len(lines) == 1 and "checkpoints/2 is damaged" in lines[0], lines
  assert os.listdir(tmp_path / "checkpoints-damaged") == ["2"]
  assert Checkpoints(tmp_path / "checkpoints").steps() == [1]


def test_no_intact_checkpoint_is_one_user_error(tmp_path):
  _two_checkpoints(tmp_path / "checkpoints").close()
  for step in ("1", "2"):
    damage.truncate(str(tmp_path / "checkpoints" / step))
  with pytest.raises(UserError, match="no intact checkpoint"):
    Checkpoints(tmp_path / "checkpoints").restore_newest(_state(0.0), lambda s: None)


def test_nan_state_is_neither_saved_nor_restored(tmp_path):
  ckpt = Checkpoints(tmp_path / "checkpoints")
  ckpt.save(1, _state(1.0), {}, force=True)
  with pytest.raises(UserError, match="NaN or inf"):
    ckpt.save(2, _state(float("nan")), {}, force=True)
  # A NaN checkpoint written behind the engine's back (with a matching digest).
  bad = _state(float("inf"))
  ckpt.manager.save(2, args=ocp.args.Composite(
      state=ocp.args.StandardSave(bad), meta=ocp.args.JsonSave({"digest": tree_digest(bad)[0]})),
      force=True)
  ckpt.close()
  lines = []
  _, _, step = Checkpoints(tmp_path / "checkpoints").restore_newest(_state(0.0), lines.append)
  assert step == 1 and "NaN or inf" in lines[0]


def test_digest_ignores_container_types_but_not_values():
  a = {"x": jnp.ones(3), "y": (jnp.zeros(2), jnp.int32(4))}
  b = {"y": [np.zeros(2, np.float32), np.int32(4)], "x": np.ones(3, np.float32)}
  assert tree_digest(a) == tree_digest(b)
  assert tree_digest(a)[0] != tree_digest({**a, "x": jnp.ones(3).at[1].set(1.0 + 2**-20)})[0]


BASELINE = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "baselines",
                        "checkpoints", "resnet20")


def _files(root) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def test_a_checkpoint_saved_before_digests_loads_and_is_left_as_it_is(tmp_path):
  """The committed baseline predates digests: ``load_trained`` reads it (the metadata
  has no ``digest``) and writes nothing into the run it reads."""
  run = tmp_path / "baseline"
  shutil.copytree(BASELINE, run)
  before = _files(run)
  trained = load_trained(run)
  assert trained.step == 4212 and "digest" not in trained.meta
  assert trained.variables["params"]["head"]["kernel"].shape == (64, 10)
  assert _files(run) == before


def test_reading_another_run_never_moves_its_damaged_checkpoints(tmp_path):
  _two_checkpoints(tmp_path / "run" / "checkpoints").close()
  damage.random_bytes(str(tmp_path / "run" / "checkpoints" / "2"))
  before = _files(tmp_path / "run")
  lines = []
  with pytest.raises(UserError, match="does not hold a model's variables"):
    load_trained(tmp_path / "run", print_fn=lines.append)  # step 1 restores, but is no model
  assert len(lines) == 1 and "left as it is" in lines[0], lines
  assert _files(tmp_path / "run") == before
