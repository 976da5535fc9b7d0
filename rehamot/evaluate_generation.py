"""Score generated motions with a trained model as the evaluator (`rehamot-eval-generation`).

A thin command file: `python rehamot/evaluate_generation.py`, `python -m rehamot.evaluate_generation` and the console
command `rehamot-eval-generation` all run `rehamot.evaluation.generation_cli.main`, where the code lives.
"""
import sys

from rehamot.evaluation.generation_cli import main

if __name__ == "__main__":
    sys.exit(main())
