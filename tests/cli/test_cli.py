"""The picpq command: help lists every option with its default; bad input ends in
one error line, exit code 2, and nothing written."""

import dataclasses
import os
import subprocess
import sys

import pytest

from picpq_jax import cli
from picpq_jax.train import TrainConfig


def _run(argv, capsys):
  code = cli.main(argv)
  captured = capsys.readouterr()
  return code, captured.err


def test_help_lists_commands(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "train" in out and "models" in out


def test_train_help_documents_every_option_with_its_default(capsys):
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  out = " ".join(capsys.readouterr().out.split())
  for field in dataclasses.fields(TrainConfig):
    flag = "--" + field.name.replace("_", "-")
    assert flag in out, flag
    assert f"(default: {field.default})" in out or f"(default: {field.default!s})" in out, field.name


@pytest.mark.parametrize("argv, message", [
    (["--data", "/nonexistent/cifar.zip"], "does not exist"),
    (["--arch", "resnet7"], "unknown architecture 'resnet7'"),
    (["--epochs", "0"], "--epochs=0 is out of range"),
    (["--lr", "-1"], "--lr=-1.0 is out of range"),
    (["--schedule", "linear"], "--schedule='linear'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, tmp_path, capsys):
  workdir = tmp_path / "run"
  code, err = _run(["train", "--workdir", str(workdir), "--no-progress", *argv], capsys)
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("picpq: error:"), err
  assert message in lines[0]
  assert not workdir.exists()


def test_corrupt_zip_is_reported(tmp_path, capsys):
  bad = tmp_path / "broken.zip"
  bad.write_bytes(b"this is not a zip archive")
  code, err = _run(["train", "--data", str(bad), "--workdir", str(tmp_path / "run")], capsys)
  assert code == 2 and "zip" in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "run").exists()


def test_unparsable_value_is_one_line_exit_2(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["train", "--batch-size", "many"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--batch-size" in err[0]


def test_batch_size_that_does_not_divide_across_devices(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  proc = subprocess.run(
      [sys.executable, "-m", "picpq_jax.cli", "train", "--batch-size", "30",
       "--workdir", str(tmp_path / "run")], env=env, capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0] == ("picpq: error: --batch-size=30 does not divide across 4 devices: "
                       "use a multiple of 4, e.g. 28"), proc.stderr
  assert not (tmp_path / "run").exists()
