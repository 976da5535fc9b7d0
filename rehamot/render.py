"""Draw a motion file as a stick figure (`rehamot-render`).

A thin command file: `python rehamot/render.py`, `python -m rehamot.render` and the console
command `rehamot-render` all run `rehamot.motion.cli.main`, where the code lives.
"""
import sys

from rehamot.motion.cli import main

if __name__ == "__main__":
    sys.exit(main())
