"""``picpq export`` and ``picpq eval`` end to end: a compress workdir (packed
``model.npz`` beside a ``config.json`` naming the training run) exported to ONNX and
StableHLO, and every form evaluated to the accuracy computed here from the JAX model."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax import cli
from picpq_jax.compress.export import export
from picpq_jax.compress.quantizers import DoReFa
from picpq_jax.data import load_embedded, normalize, train_val_split
from picpq_jax.deploy.evaluate import _train_meta
from picpq_jax.models import get_model
from tests.deploy.helpers import compacted

BASELINE = Path(__file__).resolve().parents[2] / "experiments" / "baselines" / "checkpoints" / "resnet20"


def _importable(module: str) -> bool:
  try:
    importlib.import_module(module)
  except ImportError:
    return False
  return True


HAS_ONNX = _importable("onnx") and _importable("onnxruntime")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A compress-like workdir: a compacted 2-8-bit ResNet-8 packed in model.npz."""
  folder = tmp_path_factory.mktemp("compress")
  model, variables = compacted(get_model("resnet8", quantizer=DoReFa()), seed=8)
  export(folder / "model.npz", "resnet8", variables, DoReFa(), model=model)
  (folder / "config.json").write_text(json.dumps({"checkpoint": str(BASELINE)}))
  return folder, model, variables


def _expected(model, variables, cache_dir, val_size=64):
  norm = _train_meta(str(BASELINE))["normalization"]
  _, val = train_val_split(load_embedded(cache_dir), val_size, 0)
  logits = model.apply(variables, normalize(val.images, norm["mean"], norm["std"]))
  return float(jnp.mean(jnp.argmax(logits, -1) == val.labels))


def test_export_then_eval_every_form(workdir, tmp_path, cache_dir, capsys):
  folder, model, variables = workdir
  formats = "onnx,stablehlo" if HAS_ONNX else "stablehlo"
  assert cli.main(["export", "--from", str(folder), "--formats", formats]) == 0
  printed = capsys.readouterr().out
  files = [folder / "model.npz", folder / "deploy" / "model.stablehlo"]
  if HAS_ONNX:
    files.append(folder / "deploy" / "model.onnx")
  for f in files[1:]:
    assert f"{f}: {f.stat().st_size:,} bytes" in printed
  expected = _expected(model, variables, cache_dir)
  for f in files:
    out = tmp_path / f"{f.name}.json"
    assert cli.main(["eval", "--from", str(f), "--data", "embedded", "--val-size", "64",
                     "--batch-size", "50", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["count"] == 64
    assert abs(result["accuracy"] - expected) <= 1 / 64, f  # ONNX may flip one level
    assert set(result["per_class"]) == set(load_embedded(cache_dir).class_names)
    assert np.isfinite(result["loss"])
  text = capsys.readouterr().out
  assert "accuracy airplane" in text and "loss" in text


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
  assert cli.main(["eval", "--from", str(tmp_path / "missing.onnx")]) == 2
  assert cli.main(["eval", "--from", str(tmp_path)]) == 2  # an empty folder is no run
  assert cli.main(["export", "--from", str(tmp_path), "--formats", "tflite"]) == 2
  errors = capsys.readouterr().err.strip().splitlines()
  assert len(errors) == 3 and all(e.startswith("picpq: error: ") for e in errors)
