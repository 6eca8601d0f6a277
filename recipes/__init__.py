"""Runnable experiments behind the `ntk-dynamics` command line."""
