"""Evaluate a trained model on a split under named protocols (`rehamot-eval`).

A thin command file: `python rehamot/evaluate.py`, `python -m rehamot.evaluate` and the console
command `rehamot-eval` all run `rehamot.evaluation.cli.main`, where the code lives.
"""
import sys

from rehamot.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
