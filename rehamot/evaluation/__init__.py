"""How good a trained model is, and the artefacts that say so.

Retrieval: `retrieval_metrics` (ranks → R@K, MedR, the `captions` and TMR protocols; numpy
only), `retrieval_eval` (encode a split across ranks, score protocols, tables), `figures`
(training curves, retrieval examples, rank histograms), `cli` (`rehamot-eval`) and the TMR id
lists in `protocol_lists/` (package data). Generated motions: `generation_metrics` (Guo et
al.'s metrics; numpy + scipy), `generation_eval` (a bundle as the `Evaluator`) and
`generation_cli` (`rehamot-eval-generation`). `model_card` writes a bundle's README.md.

May import the foundation (`config`, `checksums`, `distributed`, `progress`), `rehamot.data`,
`rehamot.models` and `rehamot.motion`; never loss, training or retrieval.
"""
