"""Train a motion<->text retrieval model (`rehamot-train`, `accelerate launch rehamot/train.py`).

A thin command file: `python rehamot/train.py`, `python -m rehamot.train` and the console
command `rehamot-train` all run `rehamot.training.cli.main`, where the code lives.
"""
import sys

from rehamot.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
