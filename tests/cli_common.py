"""Shared by the command-line tests: running `ntk-dynamics` in-process and expecting a user
error."""
import pytest

from recipes import cli


def usage_error(argv, capsys) -> str:
  """Runs the CLI, expecting a one-line user error with exit status 2; returns the line."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1, err
  assert err.startswith(f"ntk-dynamics {argv[0]}: error: ") and "Traceback" not in err
  assert str(e.value) == err.strip()  # pytest.raises(SystemExit, match=...) sees the message
  return err.strip()
