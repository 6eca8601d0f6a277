"""`ntk-dynamics SUBCOMMAND ...`: one entry point for every recipe."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# subcommand -> (module, one-line help). Recipe modules import JAX and friends inside `run`,
# so building the parser stays fast.
RECIPES = {
    "ntk": ("recipes.ntk", "empirical NTK of a Haiku MLP on digits: spectrum and timings"),
    "curves": ("recipes.curves", "predicted (NTK) against actual (optax) training curves"),
    "init": ("recipes.init", "NTK-based initialization tweaks judged by real training"),
    "meta": ("recipes.meta", "few-shot meta-learning with closed-form NTK inner loops"),
}


def _available() -> dict:
  out = {}
  for name, (module, help_text) in RECIPES.items():
    if importlib.util.find_spec(module) is not None:
      out[name] = (module, help_text)
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="ntk-dynamics", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, (module, help_text) in _available().items():
    sp = sub.add_parser(name, help=help_text, description=help_text)
    sp.set_defaults(_module=module)
    importlib.import_module(module).add_arguments(sp)
  args = parser.parse_args(argv)
  try:
    return importlib.import_module(args._module).run(args) or 0
  except KeyboardInterrupt:
    print("\ninterrupted: files written so far are complete (writes are atomic).",
          file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
