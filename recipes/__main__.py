"""`python -m recipes ...`: the `ntk-dynamics` command line without the installed script."""
import sys

from recipes.cli import main

sys.exit(main())
