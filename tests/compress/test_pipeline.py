"""The picpq compress pipeline end to end on a tiny run: every stage, the report's
numbers against the cost formulas, compaction and export, resume (after SIGTERM and
SIGKILL, and with a changed option: refused or restarted), and bad input."""

import json
import os
import signal
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from picpq_jax import cli
from picpq_jax.compress import CompressConfig, run_compress
from picpq_jax.engine import load_trained
from picpq_jax.errors import UserError
from picpq_jax.train import TrainConfig, train_and_evaluate
from tests.engine.harness import interrupt_after_first_checkpoint, tree_files


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A resnet8 trained for one epoch on 96 small real-format images (3 classes); the
  folder also has a 30-image test split."""
  root = tmp_path_factory.mktemp("tinydata")
  rng = np.random.default_rng(0)
  for split, count in (("train", 40), ("test", 10)):
    for c in range(3):
      os.makedirs(root / split / f"class{c}")
      for i in range(count):
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        pixels[..., c] = 250
        Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i:03d}.png")
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


@pytest.fixture(scope="module")
def full_run(trained, tmp_path_factory):
  """An uninterrupted run of every stage: ``(workdir, report)``."""
  work = tmp_path_factory.mktemp("full") / "c"
  return work, run_compress(_config(trained, work), print_fn=lambda s: None)


def test_pipeline_runs_every_stage_and_reports_consistent_costs(trained, full_run):
  work, report = full_run
  files = set(os.listdir(work))
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
  saved = json.loads((work / "report.json").read_text())
  assert saved["final"]["val"]["accuracy"] == report["final"]["val"]["accuracy"]
  # Every stage's wall time, in the report and its table.
  seconds = report["stage_seconds"]
  assert set(seconds) == {"setup", "baseline", "filter_property", "genes", "plan",
                          "finetune", "qat", "export", "evaluate"}
  assert all(s > 0 for s in seconds.values())
  assert f"| total | {sum(seconds.values()):.1f} | |" in (work / "report.md").read_text()

  # A second run refuses to overwrite; --resume reuses every finished stage.
  with pytest.raises(UserError, match="--resume"):
    run_compress(_config(trained, work), print_fn=lambda s: None)
  before = os.path.getmtime(work / "plan.npz")
  again = run_compress(_config(trained, work, resume=True), print_fn=lambda s: None)
  assert os.path.getmtime(work / "plan.npz") == before
  assert again["final"]["val"] == report["final"]["val"]
  assert again["cost"] == report["cost"]


def _argv(trained, workdir, *extra):
  return ["compress", "--from", trained, "--workdir", str(workdir), "--population", "2",
          "--sample", "1", "--generations", "1", "--tau-hat", "1", "--search-val-size", "16",
          "--ft-epochs", "1", "--qat-epochs", "1", "--fp-batches", "1", "--fp-batch-size", "16",
          "--batch-size", "16", "--target", "0.5", "--no-progress", *extra]


def test_report_gives_test_accuracy_and_picpq_eval_reproduces_each_stage(trained, full_run):
  """The final number comes from the test split nothing was chosen on; `picpq eval
  --split test` on the qat stage, the finetune stage and the packed file agrees."""
  from picpq_jax.deploy.command import EvalConfig, run_eval
  work, report = full_run
  data = load_trained(trained).meta["config"]["data"]
  for stage in ("baseline", "pruned", "finetuned", "final"):
    assert 0.0 <= report[stage]["test"]["accuracy"] <= 1.0
  ev = lambda source: run_eval(EvalConfig(source=str(source), data=data, split="test"),
                               print_fn=lambda s: None)
  qat = ev(work / "qat")
  assert qat["count"] == 30
  np.testing.assert_allclose(qat["accuracy"], report["final"]["test"]["accuracy"])
  np.testing.assert_allclose(qat["loss"], report["final"]["test"]["loss"], rtol=1e-4)
  finetune = ev(work / "finetune")
  np.testing.assert_allclose(finetune["loss"], report["finetuned"]["test"]["loss"], rtol=1e-4)
  packed = ev(work / "model.npz")  # compacted: the same predictions but for rounding ties
  assert abs(packed["accuracy"] - qat["accuracy"]) <= 1 / 30 + 1e-9
  assert set(qat["per_class"]) == {"class0", "class1", "class2"}
  text = (work / "report.md").read_text()
  assert "test accuracy" in text and "search split of" in text
  assert "Deviations from the reference" in text


def test_sigterm_sigkill_resume_equals_the_uninterrupted_run(trained, full_run, tmp_path):
  """SIGTERM in the search, SIGKILL in fine-tuning, then --resume: the same plan, final
  weights and report as a run never stopped."""
  work = tmp_path / "c"
  command = [sys.executable, "-m", "picpq_jax.cli", *_argv(trained, work)]
  term = interrupt_after_first_checkpoint(command, str(work / "evolution" / "checkpoints"),
                                          signal.SIGTERM)
  lines = term.stderr.strip().splitlines()
  assert term.returncode == 143 and len(lines) == 1 and "SIGTERM: stopped after gen" in lines[0]
  kill = interrupt_after_first_checkpoint([*command, "--resume"],
                                          str(work / "finetune" / "checkpoints"), signal.SIGKILL)
  assert kill.returncode == -signal.SIGKILL
  report = run_compress(_config(trained, work, resume=True), print_fn=lambda s: None)
  full_work, full = full_run
  assert report["final"] == full["final"] and report["cost"] == full["cost"]
  assert report["best_loss_history"] == full["best_loss_history"]
  for a, b in zip(*(jax.tree.leaves(load_trained(p / "qat").variables) for p in (work, full_work))):
    np.testing.assert_array_equal(a, b)


def test_no_evolution_uses_unit_genes_and_resume_checks_each_stage(trained, tmp_path, capsys):
  quick = ("--no-evolution", "--ft-epochs", "0", "--qat-epochs", "0", "--criterion", "l1")
  work = tmp_path / "c"
  assert cli.main(_argv(trained, work, *quick)) == 0
  report = json.loads((work / "report.json").read_text())
  assert set(report["genes"]["a"]) == {1.0} and set(report["genes"]["b"]) == {0.0}
  assert report["best_loss_history"] == []

  # --resume with another --target: refused in one line (nothing written), or redone
  # from the first stage that depends on it.
  capsys.readouterr()
  before = tree_files(work)
  assert cli.main(_argv(trained, work, *quick, "--resume", "--target", "0.4")) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and ("its genes stage was made with --target=0.5, not 0.4: pass "
                            "--target 0.5, or --restart-from genes") in err[0], err
  assert tree_files(work) == before
  assert cli.main(_argv(trained, work, *quick, "--resume", "--target", "0.4",
                        "--restart-from", "genes")) == 0
  report = json.loads((work / "report.json").read_text())
  assert report["cost"]["flops"] <= 0.4 * report["cost"]["flops_full"] * (1 + 1e-6)
  kept = next(t for p, f, t in before if f == "filter_property.npz")
  assert os.path.getmtime(work / "filter_property.npz") == kept  # independent of --target


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


def test_every_option_belongs_to_one_stage_or_may_change():
  import dataclasses
  from picpq_jax.compress.config import STAGE_FIELDS
  from picpq_jax.engine import may_change_fields
  config = CompressConfig(checkpoint="x")
  staged = [f for fields in STAGE_FIELDS.values() for f in fields]
  assert len(staged) == len(set(staged))
  assert set(staged) | may_change_fields(config) == {f.name for f in dataclasses.fields(config)}
  assert not set(staged) & may_change_fields(config)
