"""The `ltm` command line: a thin Typer layer over ltm_core."""
