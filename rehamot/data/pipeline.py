"""The training stream: WebDataset shards -> (motion window, one caption) -> collated batches.

One slot (a rank's loader worker) reads its planned shard segments (plan.py) through the shard
indexes (reading.py: each sample's members at their recorded offsets, no tar header parsed),
decodes and validates each sample (bad ones are skipped, counted, logged), mixes them in a
seeded shuffle buffer, then crops, normalises, draws a caption (from the index), batches B and
looks the captions' token ids up in the split's token table (every caption of the split
tokenised once, when the stream is built: collate.TokenTable), stopping exactly at its quota
of batches. The data order is a pure function of (seed, epoch, rank, worker):

- the shard permutation is seeded by (seed, epoch) and cut into slots rank-major (plan.py);
- the shuffle buffer's RNG is seeded by (seed, epoch, rank, worker);
- the crop and caption of the k-th sample a slot emits come from an RNG seeded by
  (seed, epoch, rank, worker, k), so `loader(epoch, start_step=s)` can skip the first batches
  without cropping, normalising or tokenising them and still emit the same later batches.
  (Skipped samples are still read and decoded: whether a sample is bad, and
  therefore where the stream stands, is only known after decoding. That is most of a sample's
  cost, so resuming at mid-epoch costs about half an epoch of one slot's reading; cropping,
  normalising, collating and tokenising are what is skipped.)
- with `length_buckets = n > 1`, each pool of n batches' worth of consecutive samples is
  sorted by crop length, cut into n batches and emitted in an order seeded by (seed, epoch,
  rank, worker, pool): padding to the batch maximum then costs little (benchmarks.md).

Integrity: at construction the manifest's every shard and index must exist (local folders) and
this split's indexes must match the manifest's sha256 (ShardSetError, one line, before any
training). Each sample read is then checked against its shard index (a digest of each
member's raw bytes, its JSON's too) before it is decoded: an altered sample is a bad sample
with reason `digest_mismatch`, so nothing the manifest does not describe is trained on.

Bad samples: a bad sample is dropped before the shuffle buffer; its slot refills its quota by
reading its own range again from the start (so one bad sample costs one repeated motion, and
the step count never changes). `batch["bad_samples"]` carries the number of bad samples the
worker met since its previous batch (a truncated shard counts every sample it lost, an index
whose map cannot be followed every sample of its shard); a
resumed epoch's batches carry the counts they carry in the uninterrupted epoch, so a running
total checkpointed with the position counts each bad sample once. `TrainStream.bad_shards()`
names the shards the workers met bad samples in (counted in memory shared with the workers:
the batches stay as they are).
`strict=True` raises BadSampleError naming the shard and key instead.

Several sources (`DataConfig.sources`, from data.sources): their train shards are numbered one
after the other and planned by plan.plan_mixture; samples are normalised with their pooled
Mean/Std (schema.mixture_mean_std), a sample's id becomes `<source>/<id>`, and each batch carries
`source_samples`, its samples per source. One source's batches are exactly a lone shard set's.

Resuming needs the same (shards or sources, seed, world_size, batch_size, num_workers).
Do not pass these loaders through accelerator.prepare: it would re-split or re-shard them.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import itertools
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rehamot.config import Config, DataSection, TrainSection, build_component, data_sources, eval_shards
from rehamot.data import schema
from rehamot.data.batch_ring import RING_KEY, BatchRing, RingWriter, host_tensor, pin_batches
from rehamot.data.collate import Tokenizer, TokenTable, collate_pairs
from rehamot.data.motion import random_window
from rehamot.data.plan import SlotPlan, SourceShards, drop_samples, mixture_samples, plan_mixture, steps_per_epoch
from rehamot.data.reading import (
    BadSample,
    BadSampleError,
    RateLimitedWarning,
    decode_indexed,
    load_indexes,
    log,
    member_url,
    read_manifest,
    read_segment,
    split_shards,
)

PREFETCH = 2  # batches each loader worker prepares ahead (the DataLoader's prefetch_factor)


@dataclass(frozen=True)
class Source:
    """One shard set of a training mixture (rehamot.config's data.sources entry)."""

    name: str
    shards: str
    weight: float = 1.0


@dataclass
class DataConfig:
    """The loader's settings; the defaults are the schema's (rehamot.config), written there once."""

    shards: str  # directory or URL prefix holding manifest.json and the tars it names
    sources: tuple[Source, ...] = ()  # training mixes these (plan.py); empty: `shards`, weight 1
    split: str = "train"
    batch_size: int = TrainSection.batch_size  # per rank
    num_workers: int = DataSection.num_workers  # loader worker processes per rank (0: the main process)
    min_len: int | None = DataSection.min_len  # shortest random window; None: min(T, max_len)
    max_len: int = DataSection.max_len  # frames; longer motions are cropped (training: random, eval: first)
    shuffle_buffer: int = DataSection.shuffle_buffer  # samples held per worker; 0 or 1: no shuffle
    seed: int = Config.seed
    strict: bool = DataSection.strict  # raise on a bad sample (digest mismatch included) instead of skipping it
    max_text_len: int = DataSection.max_text_len  # tokens
    length_buckets: int = DataSection.length_buckets  # n > 1: sort each pool of n batches by length

    def __post_init__(self) -> None:
        if (self.batch_size < 1 or self.num_workers < 0 or self.seed < 0 or self.max_len < 1
                or self.length_buckets < 0):
            raise ValueError(f"invalid DataConfig: {self}")
        if self.min_len is not None and not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"min_len must lie in [1, max_len={self.max_len}], got {self.min_len}")


def data_config(cfg: Config, split: str) -> DataConfig:
    """The loader's config for one split: the run config's data section, its batch size and seed.
    With data.sources, `shards` is the eval source's (what an EvalSet reads) and `sources` the
    mixture a TrainStream reads."""
    sources = tuple(Source(s.name, s.shards, s.weight) for s in data_sources(cfg.data)) if cfg.data.sources else ()
    return build_component(DataConfig, cfg.data, split=split, batch_size=cfg.train.batch_size, seed=cfg.seed,
                           shards=eval_shards(cfg.data), sources=sources)


def preflight(*, split: str, num_shards: int, num_samples: int, world_size: int,
              num_workers: int, batch_size: int) -> None:
    """Fail early with the numbers (webdataset alone would only say "No samples found")."""
    readers = world_size * max(num_workers, 1)
    if num_shards < readers:
        raise ValueError(
            f"split {split!r} has {num_shards} shards, fewer than the {readers} readers "
            f"({world_size} ranks x {max(num_workers, 1)} loader workers) that each need one: "
            f"use num_workers <= {max(num_shards // world_size, 0)} or rebuild the shards smaller "
            f"(shards/make_shards.py --shard-mb)")
    if steps_per_epoch(num_samples, world_size, batch_size) < 1:
        raise ValueError(
            f"split {split!r} has {num_samples} samples, fewer than one global batch of "
            f"{world_size} ranks x {batch_size} = {world_size * batch_size}")


class TrainStream:
    """The training data of one rank. `steps_per_epoch` is the same on every rank."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer | None, rank: int = 0,
                 world_size: int = 1, dropped: Mapping[str, Sequence[str]] | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.cfg, self.tokenizer, self.rank, self.world_size = cfg, tokenizer, rank, world_size
        self.sources = cfg.sources or (Source(cfg.shards.rstrip("/").rsplit("/", 1)[-1], cfg.shards),)
        manifests = [read_manifest(source.shards) for source in self.sources]
        self.manifest = manifests[0]
        self.shard_urls, self.shard_sizes, self.indexes, self.shard_source = [], [], [], []
        self.source_shards = []  # what the plan mixes
        for number, (source, manifest) in enumerate(zip(self.sources, manifests)):
            records = split_shards(manifest, cfg.split)
            sizes = tuple(int(r["samples"]) for r in records)
            self.source_shards.append(SourceShards(source.name, sizes, len(self.shard_sizes), source.weight))
            self.shard_urls += [member_url(source.shards, r["path"]) for r in records]
            self.shard_sizes += sizes
            self.shard_source += [number] * len(records)
        self.num_samples = mixture_samples(self.source_shards)  # visits per epoch
        self.feature_dim = int(self.manifest["feature_dim"])
        self.mean, self.std = schema.mixture_mean_std(manifests, [s.weight for s in self.sources], cfg.split)
        preflight(split=cfg.split, num_shards=len(self.shard_sizes), num_samples=self.num_samples,
                  world_size=world_size, num_workers=cfg.num_workers, batch_size=cfg.batch_size)
        for source, manifest in zip(self.sources, manifests):
            # every split's files (evaluation reads val and test later), this split's digests
            schema.check_shard_files(source.shards, manifest)
            self.indexes += load_indexes(source.shards, split_shards(manifest, cfg.split))
        # every caption of the split tokenised once, up front; a sample's k-th caption is row
        # caption_rows[shard][position] + k of the table
        captions = [c for index in self.indexes for c in index.captions]
        counts = np.asarray([len(c) if isinstance(c, list) else 0 for c in captions], dtype=np.int64)
        starts, at = np.concatenate([[0], np.cumsum(counts)[:-1]]), 0
        self.caption_rows = []
        for index in self.indexes:
            self.caption_rows.append(starts[at:at + len(index)])
            at += len(index)
        self.tokens = None if tokenizer is None else TokenTable.build(
            tokenizer, [text for c in captions if isinstance(c, list) for _, text in c], cfg.max_text_len)
        if dropped:  # {source: sample ids} never planned (rehamot.data.leaks: they duplicate a val/test motion)
            self.source_shards = drop_samples(self.source_shards, [index.keys for index in self.indexes], dropped)
            self.num_samples = mixture_samples(self.source_shards)
            preflight(split=cfg.split, num_shards=len(self.shard_sizes), num_samples=self.num_samples,
                      world_size=world_size, num_workers=cfg.num_workers, batch_size=cfg.batch_size)
        self.steps_per_epoch = steps_per_epoch(self.num_samples, world_size, cfg.batch_size)
        self.ring_refused = False  # /dev/shm could not hold the batch ring: not tried again
        # bad samples met per shard, in memory the loader workers (forked or spawned) share
        self.bad_per_shard = multiprocessing.RawArray("q", len(self.shard_sizes))

    def bad_shards(self) -> dict[str, int]:
        """{shard file name: bad samples this process's workers met in it}, this run; a mixture's
        shard names start with their source's name (the sources' files have the same names)."""
        prefix = [f"{self.sources[n].name}/" if len(self.sources) > 1 else "" for n in self.shard_source]
        return {p + url.rsplit("/", 1)[-1]: count
                for p, url, count in zip(prefix, self.shard_urls, self.bad_per_shard) if count}

    def plan(self, epoch: int) -> list[SlotPlan]:
        """This rank's slot plans (one per loader worker) for an epoch."""
        plans = plan_mixture(self.source_shards, seed=self.cfg.seed, epoch=epoch,
                             world_size=self.world_size, num_workers=self.cfg.num_workers,
                             batch_size=self.cfg.batch_size)
        return [p for p in plans if p.rank == self.rank]

    def dataset(self, epoch: int, start_step: int = 0) -> SlotStream:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        return SlotStream(self, epoch, start_step)

    def loader(self, epoch: int, start_step: int = 0) -> EpochBatches:
        """Yields exactly steps_per_epoch - start_step full batches, in step order."""
        workers = self.cfg.num_workers
        if workers:
            # A fast tokenizer used before the fork would otherwise warn in every worker.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Its own generator: creating an iterator draws the workers' base seed from it, not from
        # the global torch RNG that dropout uses, and that seed is a function of (seed, epoch,
        # rank) whether the epoch starts at batch 0 or at a resumed run's mid-epoch batch.
        key = "/".join(map(str, [self.cfg.seed, epoch, self.rank]))
        generator = torch.Generator().manual_seed(random.Random("rehamot/loader/" + key).getrandbits(63))
        # collate_fn: batches cross as built (the default would turn every array into a tensor
        # of its own shared-memory segment, ~0.4 ms each per batch)
        dataset = self.dataset(epoch, start_step)
        return EpochBatches(DataLoader(
            dataset, batch_size=None, num_workers=workers,
            prefetch_factor=PREFETCH if workers else None, persistent_workers=False,
            generator=generator, collate_fn=_as_built,
            worker_init_fn=functools.partial(_init_worker, os.getpid())),
            dataset.ring)


def _as_built(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _init_worker(trainer_pid: int, worker_id: int) -> None:
    _die_with_trainer(trainer_pid)
    _freeze_inherited_objects()


PARENT_POLL_S = 1.0  # how often the fallback checks that the trainer is still there


def _die_with_trainer(trainer_pid: int) -> None:
    """End this loader worker as soon as its trainer dies, however it dies.

    A trainer killed by SIGKILL runs no cleanup: its workers, blocked handing a batch over a
    pipe nobody reads, would live on with their memory. On Linux the kernel sends the worker
    SIGKILL when the thread that forked it exits (the trainer's main thread, which iterates the
    loaders); elsewhere, and under a fork server, a daemon thread notices the trainer is gone.
    A trainer that died before the request was made is caught by the check after it.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    parent = os.getppid()
    if parent != trainer_pid and not pid_alive(trainer_pid):
        os._exit(1)
    threading.Thread(target=_watch_trainer, args=(trainer_pid, parent), daemon=True,
                     name="rehamot-trainer-watch").start()


def _watch_trainer(trainer_pid: int, parent: int) -> None:
    # re-parented (forked workers) or the trainer's pid gone (a fork server's workers)
    while os.getppid() == parent and pid_alive(trainer_pid):
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # no cleanup to run: the batches in flight have no reader any more


def pid_alive(pid: int) -> bool:
    """Whether a process of this id exists (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _freeze_inherited_objects() -> None:
    """Keep a loader worker's garbage collector off what it inherited from the trainer.

    A forked worker holds the trainer's whole heap (torch, transformers: ~10^6 objects). Each
    full collection would walk all of them and, by touching their headers, copy their pages
    (copy-on-write): measured, a third of a worker's time went into JSON decoding that way.
    Frozen, they are never collected here (the worker exits at the end of the epoch).
    """
    gc.freeze()


class EpochBatches:
    """The DataLoader of an epoch, its batches completed on the trainer's side.

    A loader worker leaves a batch's padded motions in its ring slot (batch_ring.py) and sends
    the small arrays (masks, lengths, ids, tokens: a few KB) inside the pickled batch, where a
    shared-memory segment each would cost more than their bytes; here the motions are copied
    out of the slot (without a ring, when /dev/shm could not hold it, the motions come inside
    the pickled batch too) and the arrays become tensors, in pinned memory when CUDA is there
    (batch_ring.pin_batches: the one copy each takes anyway lands there).
    """

    def __init__(self, loader: DataLoader, ring: BatchRing | None) -> None:
        self.loader, self.ring = loader, ring
        self.pin = pin_batches()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            if self.ring is not None:
                batch = self.ring.take(batch, self.pin)
            yield {key: host_tensor(value, self.pin) if isinstance(value, (np.ndarray, torch.Tensor)) else value
                   for key, value in batch.items()}


class SlotStream(IterableDataset):
    """The batches of one rank in one epoch; each loader worker streams its own slot."""

    def __init__(self, stream: TrainStream, epoch: int, start_step: int) -> None:
        super().__init__()
        self.stream, self.epoch, self.start_step = stream, epoch, start_step
        self.slots = stream.plan(epoch)
        cfg = stream.cfg
        # A worker is handed batch j once the trainer received its batch j - PREFETCH, whose
        # slot is free once copied: PREFETCH + 1 slots keep it from waiting.
        self.ring = None
        if cfg.num_workers and not stream.ring_refused:
            self.ring, why = BatchRing.allocate(cfg.num_workers, PREFETCH + 1, cfg.batch_size, cfg.max_len,
                                                stream.feature_dim)
            if why:  # said once; the later epochs of the run skip the ring
                stream.ring_refused = True
                log.warning(f"WARNING: {why}")

    def __len__(self) -> int:
        return self.stream.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker = 0 if info is None else info.id
        # The DataLoader asks its workers round-robin from worker 0, but step start_step belongs
        # to slot start_step % nw: rotate so that loader worker 0 serves that slot.
        slot = self.slots[(loader_worker + self.start_step) % len(self.slots)]
        ring = None if info is None or self.ring is None else self.ring.writer(loader_worker)
        return _SlotReader(self.stream, self.epoch, slot, self.start_step, ring, info is not None).batches()


class _SlotReader:
    def __init__(self, stream: TrainStream, epoch: int, slot: SlotPlan, start_step: int,
                 ring: RingWriter | None, in_worker: bool = False) -> None:
        self.stream, self.cfg, self.epoch, self.slot, self.ring = stream, stream.cfg, epoch, slot, ring
        self.in_worker = in_worker
        self.seed_key = [self.cfg.seed, epoch, slot.rank, slot.worker]
        self.skip_batches = sum(1 for b in slot.batches if b < start_step)
        self.bad_since_batch = 0
        self.warn = RateLimitedWarning(log)

    def batches(self) -> Iterator[dict[str, Any]]:
        """The slot's batches in delivery order, from batch `skip_batches` on.

        Length bucketing (length_buckets = n > 1): the shuffled stream is cut into pools of n
        batches' worth of samples (slot-local batches [j*n, j*n + n), the last pool shorter),
        each pool is sorted by cropped length and cut into its batches, and those are emitted
        in an order drawn from (seed, epoch, rank, worker, pool). Within a batch the samples
        keep their stream order. Every pool holds the same samples as without bucketing, so
        the epoch's visits and batch counts are unchanged; a crop's length comes from the
        sample's own RNG, so a resumed pool sorts exactly as the uninterrupted one did.
        A pool keeps n * batch_size decoded motions in the worker, beside the shuffle buffer
        (paper size, n = 8, B = 32: ~35 MB; B = 512: ~0.5 GB per loader worker).
        """
        cfg, size = self.cfg, self.cfg.batch_size
        num_batches = len(self.slot.batches)
        samples = itertools.islice(self._good_samples(), num_batches * size)
        if cfg.shuffle_buffer > 1:
            rng = random.Random("rehamot/buffer/" + "/".join(map(str, self.seed_key)))
            samples = _shuffle(samples, cfg.shuffle_buffer, rng)
        stream = enumerate(samples)  # the counter k seeds sample k's crop and caption
        per_pool = max(cfg.length_buckets, 1)
        for first in range(0, num_batches, per_pool):
            pool = list(itertools.islice(stream, min(per_pool, num_batches - first) * size))
            if first + len(pool) // size <= self.skip_batches:
                # resuming: the stream position is all that matters here, and the bad samples
                # met on the way belong to batches the run counted before its checkpoint
                self.bad_since_batch = 0
                continue
            draws = [self._draw(counter, meta, motion) for counter, (meta, motion) in pool]
            for local, rows in enumerate(self._arrange(draws, first // per_pool), start=first):
                if local < self.skip_batches:
                    self.bad_since_batch = 0
                    continue
                items = [self._item(pool[row][1], draws[row]) for row in rows]
                batch = self._collate(items)
                if len(self.stream.sources) > 1:  # samples drawn from each source, in source order
                    batch["source_samples"] = np.bincount([pool[row][1][0]["__source__"] for row in rows],
                                                          minlength=len(self.stream.sources))
                batch["step"], batch["bad_samples"] = self.slot.batches[local], self.bad_since_batch
                self.bad_since_batch = 0
                yield batch

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """One batch; from a loader worker, as EpochBatches completes it on the trainer's side."""
        stream, out, address = self.stream, None, None
        if self.ring is not None:
            frames = max(item["motion"].shape[0] for item in items)
            out, address = self.ring.buffer(len(items), frames)
        batch = collate_pairs(items, None, self.cfg.max_text_len, stream.mean, stream.std, out)
        if stream.tokens is not None:
            batch.update(stream.tokens.batch([item["caption_row"] for item in items]))
        if not self.in_worker:
            return {key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
                    for key, value in batch.items()}
        if address is not None:  # the motions wait in the ring slot
            del batch["motion"]
            batch[RING_KEY] = address
        # arrays travel inside the pickled batch; the motions too without a ring (no /dev/shm)
        return {key: value.numpy() if isinstance(value, torch.Tensor) and (key != "motion" or out is None)
                else value for key, value in batch.items()}

    def _arrange(self, draws: list[tuple[int, int, int]], pool_index: int) -> list[list[int]]:
        """A pool's rows cut into batches: in stream order, or bucketed by crop length."""
        size = self.cfg.batch_size
        if self.cfg.length_buckets <= 1:
            return [list(range(i, i + size)) for i in range(0, len(draws), size)]
        by_length = sorted(range(len(draws)), key=lambda row: (draws[row][2], row))
        buckets = [sorted(by_length[i : i + size]) for i in range(0, len(draws), size)]
        key = "/".join(map(str, [*self.seed_key, pool_index]))
        random.Random("rehamot/buckets/" + key).shuffle(buckets)
        return buckets

    def _draw(self, counter: int, meta: dict[str, Any], motion: np.ndarray
              ) -> tuple[int, int, int]:
        """Sample `counter`'s (caption index, crop start, crop length), from its own RNG."""
        rng = np.random.default_rng([*self.seed_key, counter])
        caption = int(rng.integers(len(meta["captions"])))
        start, length = random_window(motion.shape[0], self.cfg.min_len, self.cfg.max_len, rng)
        return caption, start, length

    def _item(self, sample: tuple[dict[str, Any], np.ndarray], draw: tuple[int, int, int]
              ) -> dict[str, Any]:
        (meta, motion), (caption_index, start, length) = sample, draw
        caption_id, text = meta["captions"][caption_index]
        sources = self.stream.sources
        # corpora number their motions alike: in a mixture an id names its source too, so the
        # loss never takes two corpora's motions for one
        sample_id = f"{sources[meta['__source__']].name}/{meta['id']}" if len(sources) > 1 else meta["id"]
        return {"motion": motion[start : start + length],  # normalised as it is collated
                "id": sample_id, "caption_id": caption_id, "text": text, "shard": meta["__shard__"],
                "caption_row": meta["__row__"] + caption_index}

    def _good_samples(self) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        """The slot's decoded samples, its range read again from the start while the quota
        is not met (only bad samples make it short); the caller stops at the quota."""
        while True:
            good = 0
            for segment in self.slot.segments:
                url = self.stream.shard_urls[segment.shard]
                index = self.stream.indexes[segment.shard]
                for meta, motion in self._segment_samples(segment.shard, url, index, segment.first,
                                                          segment.stop):
                    meta["__source__"] = self.stream.shard_source[segment.shard]
                    good += 1
                    yield meta, motion
            if good == 0:
                raise RuntimeError(f"rank {self.slot.rank} worker {self.slot.worker}: no usable "
                                   f"sample in its {self.slot.num_samples} planned samples")

    def _segment_samples(self, shard: int, url: str, index: schema.ShardIndex, first: int, stop: int
                         ) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        raws = read_segment(url, index, first, stop, schema.member_cap(self.stream.feature_dim))
        rows, position = self.stream.caption_rows[shard], first
        while True:
            try:
                raw = next(raws)
            except StopIteration:
                return
            except Exception as exn:  # cut short, unreachable, its map out of range: the rest is lost
                self._bad(url, f"samples {position}..{stop - 1}", f"shard unreadable: {exn!r}", stop - position)
                return
            position = raw["__position__"] + 1
            try:
                captions, motion = decode_indexed(index, raw, self.stream.feature_dim)  # digests first
            except BadSample as exn:
                self._bad(url, raw["__key__"], str(exn), 1)
                continue
            # batches name each item's shard; its captions' token rows follow from the first's
            yield {"id": raw["__key__"], "captions": captions, "__shard__": index.shard,
                   "__row__": int(rows[position - 1])}, motion

    def _bad(self, url: str, where: Any, reason: str, count: int) -> None:
        message = f"bad sample in {url}, {where}: {reason}"
        if self.cfg.strict:
            raise BadSampleError(message)
        self.bad_since_batch += count
        self.stream.bad_per_shard[self.stream.shard_urls.index(url)] += count
        self.warn(f"skipped {count} {message}")


def _shuffle(samples: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's sample shuffle buffer, with our own seeded RNG."""
    return wds.shuffle(bufsize=bufsize, initial=min(bufsize, 100), rng=rng)(iter(samples))
