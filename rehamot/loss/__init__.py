"""The training objective: what a step minimises, over the global batch.

`chunked` (SH / MH / DropTriple / InfoNCE on local rows × global columns, never a B×G matrix
under autograd), `dense` (the B×G reference losses, the single-process loss and the
dispatcher between the two implementations), `objective` (gather with gradients → masks → loss
→ scaling, and the SH → DropTriple schedule) and `grad_cache` (micro-batches that still see
every negative of the global batch).

May import the foundation (`rehamot.config`, `rehamot.distributed`); only `objective` imports
`rehamot.distributed`, and nothing here imports data, models, evaluation, training or
accelerate.
"""
