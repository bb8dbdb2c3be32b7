"""The `ltm` command line: a thin Typer layer over ltm_core."""

import os
import sys

if "COLUMNS" not in os.environ and not sys.stdout.isatty():
    # rich draws 80 columns when writing to a file or a pipe, which cuts the wider tables (`ltm eval task=...`,
    # `ltm bench`) mid-word in logs; a wider page keeps them whole (set COLUMNS to choose)
    os.environ["COLUMNS"] = "160"
