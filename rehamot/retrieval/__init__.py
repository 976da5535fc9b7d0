"""A trained model put to use as a search engine.

`index` (the embedding index of a split and its text/motion queries; re-exported as
`rehamot.search_index`), `server` (the local search page and its JSON API; the page's files
are the package data in `web/`) and `cli` (`rehamot-search`).

May import the foundation, `rehamot.data`, `rehamot.models`, `rehamot.motion` and
`rehamot.evaluation`; never loss or training.
"""
