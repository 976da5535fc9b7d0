"""The training run: the loop and everything a run directory holds.

`trainer` (one optimizer step, validation, checkpoints, export), `accelerator` (the only module
that imports accelerate / DeepSpeed), `checkpoint` (atomic, checksummed checkpoints),
`run_dir` (choosing the run directory, its config.yaml and meta.json), `run_lock` (one owner
per run directory), `run_log` (progress lines, metrics.jsonl, TensorBoard), `lr_schedule`,
`cpu_threads` (threads from the usable cores), `text_cache` (the frozen-LM feature cache) and
`cli` (`rehamot-train`).

The top floor of the library: may import every other part except `rehamot.retrieval`.
"""
