"""The workdir guard and the resume check: one line, exit 2, nothing written."""

import dataclasses
import os
import stat

import pytest

from picpq_jax import cli
from picpq_jax.engine import open_workdir
from picpq_jax.errors import UserError
from picpq_jax.options import option
from tests.engine.harness import tree_files


@dataclasses.dataclass(frozen=True)
class Config:
  workdir: str = option("runs/x", "folder", may_change=True)
  lr: float = option(0.1, "learning rate")
  epochs: int = option(2, "epochs", may_change=True)
  resume: bool = option(False, "continue", may_change=True)


def test_guard_resume_check_and_fresh_start(tmp_path):
  work = str(tmp_path / "run")
  lines = []
  fresh = open_workdir(Config(workdir=work, resume=True), print_fn=lines.append)
  assert not fresh.resuming and lines == [f"picpq: --resume: {work} holds no run yet; "
                                          f"starting fresh"]
  assert not os.path.exists(work)  # opening writes nothing
  fresh.write_config()
  with pytest.raises(UserError, match="already holds a run: pass --resume"):
    open_workdir(Config(workdir=work))
  with pytest.raises(UserError) as e:
    open_workdir(Config(workdir=work, lr=0.2, resume=True))
  assert str(e.value) == (f"cannot resume {work}: it was made with --lr=0.1, not 0.2: pass "
                          f"--lr 0.1 to continue it, or choose another --workdir")
  assert open_workdir(Config(workdir=work, epochs=5, resume=True)).resuming  # may change


def test_a_file_or_a_read_only_folder_is_refused(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="is a file, not a folder"):
    open_workdir(Config(workdir=str(tmp_path / "file")))
  with pytest.raises(UserError, match="cannot be created"):
    open_workdir(Config(workdir=str(tmp_path / "file" / "sub")))
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
  try:
    with pytest.raises(UserError, match="is not writable"):
      open_workdir(Config(workdir=str(locked / "run")))
  finally:
    locked.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("case", ["file", "read_only", "changed_lr"])
def test_train_command_refuses_in_one_line_before_any_work(case, tmp_path, capsys):
  work = tmp_path / "run"
  extra = []
  if case == "file":
    work.write_text("not a folder")
  elif case == "read_only":
    work.mkdir()
    work.chmod(stat.S_IRUSR | stat.S_IXUSR)
  else:
    work.mkdir()
    (work / "config.json").write_text('{"lr": 0.1, "arch": "resnet8"}')
    extra = ["--resume", "--lr", "0.2"]
  before = tree_files(tmp_path)
  try:
    code = cli.main(["train", "--arch", "resnet8", "--workdir", str(work), "--no-progress",
                     *extra])
  finally:
    if work.is_dir():
      work.chmod(stat.S_IRWXU)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("picpq: error: "), err
  assert tree_files(tmp_path) == before
