"""Package data: TMR's fixed evaluation id lists (MIT, see LICENSE and README.md here).

A regular package (not a namespace one) so that setuptools' package discovery ships it and
`importlib.resources` finds the lists in an installed wheel as well as in a checkout.
"""
