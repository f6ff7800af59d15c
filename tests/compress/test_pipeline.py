"""The picpq compress pipeline end to end on a tiny run: every stage, the report's
numbers against the cost formulas, compaction and export, resume, and bad input."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from picpq_jax import cli
from picpq_jax.compress import CompressConfig, run_compress
from picpq_jax.errors import UserError
from picpq_jax.train import TrainConfig, train_and_evaluate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A resnet8 trained for one epoch on 96 small real-format images (3 classes)."""
  root = tmp_path_factory.mktemp("tinydata")
  rng = np.random.default_rng(0)
  for c in range(3):
    os.makedirs(root / "train" / f"class{c}")
    for i in range(40):
      pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
      pixels[..., c] = 250
      Image.fromarray(pixels).save(root / "train" / f"class{c}" / f"{i:03d}.png")
  workdir = tmp_path_factory.mktemp("train") / "run"
  cache = str(tmp_path_factory.mktemp("cache"))
  train_and_evaluate(TrainConfig(arch="resnet8", data=str(root), workdir=str(workdir),
                                 val_size=24, epochs=2, batch_size=16, progress=False,
                                 cache_dir=cache), print_fn=lambda s: None)
  return str(workdir)


def _config(trained, workdir, **kw):
  settings = dict(checkpoint=trained, workdir=str(workdir), population=2, sample=1,
                  generations=1, tau_hat=1, search_val_size=16, ft_epochs=1, qat_epochs=1,
                  fp_batches=1, fp_batch_size=16, batch_size=16, target=0.5, progress=False)
  return CompressConfig(**{**settings, **kw})


def test_pipeline_runs_every_stage_and_reports_consistent_costs(trained, tmp_path):
  report = run_compress(_config(trained, tmp_path / "c"), print_fn=lambda s: None)
  files = set(os.listdir(tmp_path / "c"))
  for name in ("baseline.json", "filter_property.npz", "genes.npz", "plan.npz", "pruned.json",
               "report.json", "report.md", "layers.png", "curves.png", "model.npz"):
    assert name in files, name

  # The report's totals follow from its own per-layer rows by DESIGN 7's formulas.
  rows = report["layers"]
  flops = sum(r["macs"] for r in rows)
  bops = sum(r["macs"] * r["w_bits"] * r["a_bits"] for r in rows if r["layer"] != "head")
  head = next(r for r in rows if r["layer"] == "head")
  bops += (head["in"] * head["out"] + head["out"]) * 32 * 32
  np.testing.assert_allclose(report["cost"]["flops"], flops, rtol=1e-6)
  np.testing.assert_allclose(report["cost"]["bops"], bops, rtol=1e-6)
  assert report["cost"]["flops"] <= 0.5 * report["cost"]["flops_full"] * (1 + 1e-6)
  # First conv and classifier stay in full precision; the others got fewer bits.
  assert rows[0]["w_bits"] == 32 and head["w_bits"] == 32
  assert all(r["w_bits"] <= 8 for r in rows[1:-1])
  # The deployed model reproduces the masked one and is smaller on disk.
  d = report["deployed"]
  assert d["compacted_vs_masked_max_logit_diff"] < 1e-3 * max(1.0, d["logits_max_abs"])
  assert d["loaded_vs_masked_max_logit_diff"] < 1e-3 * max(1.0, d["logits_max_abs"])
  assert d["check_images"] > 0 and d["compacted_vs_masked_top1_agreement"] == 1.0
  assert d["file_bytes"] < d["float32_bytes"] / 2
  saved = json.loads((tmp_path / "c" / "report.json").read_text())
  assert saved["final"]["val"]["accuracy"] == report["final"]["val"]["accuracy"]

  # A second run refuses to overwrite; --resume reuses every finished stage.
  with pytest.raises(UserError, match="--resume"):
    run_compress(_config(trained, tmp_path / "c"), print_fn=lambda s: None)
  before = os.path.getmtime(tmp_path / "c" / "plan.npz")
  again = run_compress(_config(trained, tmp_path / "c", resume=True), print_fn=lambda s: None)
  assert os.path.getmtime(tmp_path / "c" / "plan.npz") == before
  assert again["final"]["val"] == report["final"]["val"]
  assert again["cost"] == report["cost"]


def test_no_evolution_uses_unit_genes(trained, tmp_path):
  report = run_compress(_config(trained, tmp_path / "c", evolution=False, ft_epochs=0,
                                qat_epochs=0, criterion="l1"), print_fn=lambda s: None)
  assert set(report["genes"]["a"]) == {1.0} and set(report["genes"]["b"]) == {0.0}
  assert report["best_loss_history"] == []


def test_uniform_allocation_keeps_one_fraction_and_one_bit_width(trained, tmp_path):
  report = run_compress(_config(trained, tmp_path / "c", evolution=False, ft_epochs=0,
                                qat_epochs=0, allocation="uniform", uniform_bits=5),
                        print_fn=lambda s: None)
  rows = report["layers"]
  assert [r["w_bits"] for r in rows[1:-1]] == [5] * (len(rows) - 2)
  assert rows[0]["w_bits"] == 32 and rows[-1]["w_bits"] == 32
  assert report["cost"]["flops"] <= 0.5 * report["cost"]["flops_full"] * (1 + 1e-6)
  # resnet8: the stage widths 16/32/64 keep the same fraction up to one channel.
  fractions = [r["out"] / r["out_full"] for r in rows[1:-1]]
  assert max(fractions) - min(fractions) <= 1 / 16 + 1e-9
  code = cli.main(["compress", "--from", trained, "--workdir", str(tmp_path / "u"),
                   "--allocation", "uniform"])
  assert code == 2 and not (tmp_path / "u").exists()


def test_bad_compress_input_is_one_line_and_exit_2(tmp_path, capsys):
  code = cli.main(["compress", "--from", str(tmp_path / "missing"), "--workdir",
                   str(tmp_path / "out")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "does not exist" in err[0]
  assert not (tmp_path / "out").exists()
  code = cli.main(["compress", "--from", str(tmp_path), "--target", "1.5"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and err == ["picpq: error: --target=1.5 is out of range: use (0, 1]"]
  code = cli.main(["compress", "--from", str(tmp_path), "--max-bits", "32,eightx3"])
  assert code == 2 and "--max-bits" in capsys.readouterr().err
