"""Index, query and serve a trained model's motions and captions (`rehamot-search`).

A thin command file: `python rehamot/search.py`, `python -m rehamot.search` and the console
command `rehamot-search` all run `rehamot.retrieval.cli.main`, where the code lives.
"""
import sys

from rehamot.retrieval.cli import main

if __name__ == "__main__":
    sys.exit(main())
