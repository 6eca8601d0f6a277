"""`ntk-dynamics SUBCOMMAND ...`: one entry point for every recipe.

Exit status: 0 done; 1 the run finished but failed (e.g. a non-finite meta-loss); 2 a user
error, reported as one line `ntk-dynamics SUBCOMMAND: error: MESSAGE` on stderr (bad
arguments, impossible sizes, a missing dataset, an unusable checkpoint: ValueError, OSError and
recipe refusals); 130 interrupted (Ctrl-C). Anything else is a bug and keeps its traceback, as
does a user error when NTK_DYNAMICS_TRACEBACK=1.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import pathlib
import sys
import tempfile
from typing import Optional, Sequence

# subcommand -> (module, one-line help). Recipe modules import JAX and friends inside `run`,
# so building the parser stays fast.
RECIPES = {
    "ntk": ("recipes.ntk", "empirical NTK of a Haiku MLP on digits: spectrum and timings"),
    "curves": ("recipes.curves", "predicted (NTK) against actual (optax) training curves"),
    "init": ("recipes.init", "NTK-based initialization tweaks judged by real training"),
    "meta": ("recipes.meta", "few-shot meta-learning with closed-form NTK inner loops"),
}
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Exceptions that are the user's (arguments, data, files), not the code's. ValueError covers
# `runs.CorruptCheckpointError` and `tasks.DatasetNotPreparedError`.
USER_ERRORS = (ValueError, OSError)


class UsageError(SystemExit):
  """A user error, already printed on stderr: exits with status 2; `str()` is the line."""

  def __init__(self, line: str) -> None:
    super().__init__(EXIT_USAGE)
    self.line = line

  def __str__(self) -> str:
    return self.line


def fail(prog: str, message: str) -> UsageError:
  """Prints `PROG: error: MESSAGE` (one line) on stderr; returns the UsageError to raise."""
  message = " ".join(str(message).split("\n")).strip()
  for prefix in ("error:", f"{prog.split()[-1]}:", "error:"):
    if message.startswith(prefix):
      message = message[len(prefix):].strip()
  line = f"{prog}: error: {message}"
  print(line, file=sys.stderr, flush=True)
  return UsageError(line)


class Parser(argparse.ArgumentParser):
  """argparse with one-line errors (`PROG: error: MESSAGE (see PROG --help)`), exit status 2."""

  def error(self, message: str):  # noqa: D102 - argparse's hook
    raise fail(self.prog, f"{message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------- argument types
# For `type=`: argparse reports a bad value as `argument --FLAG: MESSAGE` at parse time.


def _int(text: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
  v = _int(text)
  if v < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
  return v


def non_negative_int(text: str) -> int:
  v = _int(text)
  if v < 0:
    raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
  return v


def refuse_other_settings(command: str, what: str, stored: dict, settings: dict,
                          flags: set) -> None:
  """Raises SystemExit when `--resume` would mix results computed with other settings:
  names up to four that changed (as --flags where they are options), old -> new."""
  changed = [f"{'--' + k.replace('_', '-') if k in flags else k} {stored.get(k)!r} -> "
             f"{settings.get(k)!r}" for k in sorted(set(stored) | set(settings))
             if stored.get(k) != settings.get(k)]
  if changed:
    raise SystemExit(f"{command}: --resume: {what} other settings ("
                     + "; ".join(changed[:4]) + ("; ..." if len(changed) > 4 else "")
                     + "); use another --out, or drop --resume to start over.")


def _finite_float(text: str, zero_ok: bool) -> float:
  try:
    v = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not (math.isfinite(v) and (v > 0 or (zero_ok and v == 0))):
    raise argparse.ArgumentTypeError(
        f"must be a finite number {'>=' if zero_ok else '>'} 0, got {text!r}")
  return v


def positive_float(text: str) -> float:
  return _finite_float(text, zero_ok=False)


def non_negative_float(text: str) -> float:
  return _finite_float(text, zero_ok=True)


# `jax.random.PRNGKey` keeps only the low 32 bits of a seed unless jax_enable_x64 is on (2**32
# gives seed 0's key) and overflows beyond 2**63: seeds live in [0, 2**32).
SEED_LIMIT = 2 ** 32


def seed_int(text: str) -> int:
  """A type for an initialization seed: an int in [0, 2**32)."""
  v = non_negative_int(text)
  if v >= SEED_LIMIT:
    raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text!r}")
  return v


def out_folder(text: str) -> str:
  """A type for --out: a non-empty path."""
  if not text.strip():
    raise argparse.ArgumentTypeError(f"must name a folder, got {text!r}")
  return text


def writable_folder(path, files: Sequence[str] = (), flag: str = "--out") -> pathlib.Path:
  """Creates folder `path` if needed and checks, before any work, that `files` can be written
  there; a run that could not save its results would lose them. Raises SystemExit naming
  `flag` otherwise."""
  path = pathlib.Path(path)
  problem = None
  if path.exists() and not path.is_dir():
    problem = "it is a file, not a folder"
  else:
    try:
      path.mkdir(parents=True, exist_ok=True)
      with tempfile.TemporaryFile(dir=path):
        pass
    except OSError as e:
      problem = f"cannot write files there ({e.strerror or e})"
    else:
      folders = [name for name in files if (path / name).is_dir()]
      if folders:
        problem = f"{folders[0]} there is a folder, where the results file goes"
  if problem:
    raise SystemExit(f"{flag} {str(path)!r}: {problem}.")
  return path


def int_list(minimum: Optional[int] = None, maximum: Optional[int] = None):
  """A type for comma-separated, non-empty lists of distinct ints (each in [minimum,
  maximum))."""

  def parse(text: str) -> list[int]:
    try:
      values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"must be comma-separated integers, got {text!r}") from None
    if not values:
      raise argparse.ArgumentTypeError(f"must list at least one integer, got {text!r}")
    if minimum is not None and min(values) < minimum:
      raise argparse.ArgumentTypeError(f"values must be >= {minimum}, got {text!r}")
    if maximum is not None and max(values) >= maximum:
      bound = "2**32" if maximum == SEED_LIMIT else maximum
      raise argparse.ArgumentTypeError(f"values must be < {bound}, got {text!r}")
    if len(set(values)) != len(values):
      raise argparse.ArgumentTypeError(f"repeats a value: {text!r}")
    return values

  parse.__name__ = "int_list"
  return parse


# ----------------------------------------------------------------------------- entry point


def _available() -> dict:
  out = {}
  for name, (module, help_text) in RECIPES.items():
    if importlib.util.find_spec(module) is not None:
      out[name] = (module, help_text)
  return out


def build_parser() -> argparse.ArgumentParser:
  parser = Parser(prog="ntk-dynamics", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                              parser_class=Parser)
  for name, (module, help_text) in _available().items():
    sp = sub.add_parser(name, help=help_text, description=help_text)
    sp.set_defaults(_module=module)
    importlib.import_module(module).add_arguments(sp)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs one subcommand; returns its exit status, or raises SystemExit(2) (`UsageError`)
  after printing a one-line error."""
  args = build_parser().parse_args(argv)
  prog = f"ntk-dynamics {args.command}"
  traceback = os.environ.get("NTK_DYNAMICS_TRACEBACK", "") not in ("", "0")
  try:
    return importlib.import_module(args._module).run(args) or 0
  except KeyboardInterrupt:
    # Every recipe keeps its partial results itself and returns 130; this is the fallback.
    print(f"\n{prog}: interrupted; files written so far are complete (writes are atomic).",
          file=sys.stderr)
    return EXIT_INTERRUPTED
  except UsageError:
    raise
  except SystemExit as e:
    # A recipe's refusal, `raise SystemExit("message")`.
    if not isinstance(e.code, str):
      raise
    raise fail(prog, e.code) from None
  except USER_ERRORS as e:
    if traceback:
      raise
    raise fail(prog, str(e) or type(e).__name__) from None


if __name__ == "__main__":
  sys.exit(main())
