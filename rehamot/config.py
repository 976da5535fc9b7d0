"""Typed configuration: schema defaults <- YAML file <- dotted `key=value` overrides.

The schema's sections are the components' own configs: `LossConfig` is what the objective
takes, and the data pipeline and the two towers build theirs from their sections with
`build_component`, which refuses a component option that has no schema key. Each option is
written once, here, with its default, its one-line help (`rehamot-train --help`), and its
allowed values or range, checked when a section is constructed (so a YAML file, an override
and a direct `LossConfig(...)` are checked alike).

OmegaConf structured configs do the merging: an unknown key or a value of the wrong type is
an error that names the key. The resolved config written to a run directory reloads under
the same schema (`load_config(run_dir / "config.yaml")`). No torch here: entry points load
and check a config before they import the heavy stack.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

# The allowed values of each choice option, written once; rehamot.loss and the models use these.
LOSS_NAMES = ("sh", "mh", "droptriple", "infonce")
THRESHOLD_MODES = ("symmetric", "per_direction")
REDUCTIONS = ("mean", "sum")
LOSS_IMPLEMENTATIONS = ("chunked", "dense")  # dense: the B x G reference (tests, benchmarks)
POOLINGS = ("auto", "mean", "cls")
ACTIVATIONS = ("gelu", "relu")
SCHEDULES = ("constant", "step", "cosine")
NONFINITE_ACTIONS = ("skip", "stop")
# what a run does with train samples that duplicate a val/test sample (rehamot.data.leaks)
LEAK_ACTIONS = ("auto", "drop", "report", "off")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


# A range check: (predicate, what the value must be).
Check = tuple[Callable[[Any], bool], str]


def _finite(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and math.isfinite(v))


AT_LEAST_1: Check = (lambda v: v is None or v >= 1, "must be >= 1")
NON_NEGATIVE: Check = (lambda v: v is None or (_finite(v) and v >= 0), "must be >= 0")
POSITIVE: Check = (lambda v: v is None or (_finite(v) and v > 0), "must be > 0")
COSINE: Check = (lambda v: _finite(v) and -1 < v <= 1, "must be a cosine in (-1, 1]")
PROBABILITY: Check = (lambda v: v is None or (_finite(v) and 0 <= v < 1), "must be in [0, 1)")
# numpy's legacy np.random.seed (called by accelerate's set_seed) takes [0, 2**32 - 1]; every
# other seed is derived from it by hashing or as SeedSequence entropy, which take any such int.
SEED_RANGE: Check = (lambda v: isinstance(v, int) and 0 <= v <= 2**32 - 1, "must be in [0, 2**32 - 1]")
FRACTION: Check = (lambda v: _finite(v) and 0 <= v <= 1, "must be a fraction in [0, 1]")


def option(default: Any = NO_DEFAULT, help: str = "", *, choices: Sequence[str] | None = None,
           check: Check | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A schema field: its default, one line of help, and its allowed values or range."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class Section:
    """Base of the schema's sections: checks every field's choices and range on construction."""

    key: ClassVar[str] = ""  # the section's name in the config ("loss", "train", ...)

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value, name = getattr(self, f.name), f"{self.key}.{f.name}" if self.key else f.name
            choices, check = f.metadata.get("choices"), f.metadata.get("check")
            if choices and value not in choices:
                raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name}={value}: must be a finite number")
            if check is not None and not check[0](value):
                raise ConfigError(f"{name}={value!r}: {check[1]}")
        self.check()

    def check(self) -> None:
        """Checks that involve several fields of the section."""


@dataclass
class RunSection(Section):
    key: ClassVar[str] = "run"
    dir: Optional[str] = option(None, "run directory; unset: <root>/<name>-<date>-<time>, chosen once on rank 0")
    root: str = option("runs", "parent of the timestamped run directories")
    name: str = option("rehamot", "prefix of the run directory's name")
    overwrite: bool = option(False, "start over in a run.dir that holds a run: delete that run's files first")


DEMO_SHARDS = "data/demo"  # where configs/demo.yaml and `make demo` put the demo corpus


@dataclass
class SourceSection(Section):
    """One corpus of a mixture: its shard set and how much of an epoch it fills."""

    key: ClassVar[str] = "data.sources[]"
    shards: str = option(NO_DEFAULT, "folder holding manifest.json (or a URL prefix)")
    name: Optional[str] = option(None, "what logs and metrics call it; unset: the folder's name")
    weight: float = option(1.0, "visits per train sample and epoch (2: twice, 0.5: a different half each epoch)",
                           check=POSITIVE)

    def check(self) -> None:
        if self.name is None:
            self.name = self.shards.rstrip("/").rsplit("/", 1)[-1] or self.shards


@dataclass
class DataSection(Section):
    key: ClassVar[str] = "data"
    shards: Optional[str] = option(None, "folder holding manifest.json (or a URL prefix); or set data.sources")
    sources: list[SourceSection] = option(help="several corpora mixed in each epoch: a list of "
                                               "{shards, name, weight}; instead of data.shards", factory=list)
    eval_source: Optional[str] = option(None, "with data.sources: the source whose val and test splits are "
                                              "evaluated; unset: the first")
    train_split: str = option("train", "split trained on")
    val_split: str = option("val", "split for validation and choosing best/")
    test_split: str = option("test", "split evaluated at the end")
    num_workers: int = option(1, "loader worker processes per rank (0: read in the training process)",
                              check=NON_NEGATIVE)
    min_len: Optional[int] = option(None, "shortest training crop, frames; unset: min(T, max_len) at a random start",
                                    check=AT_LEAST_1)
    max_len: int = option(196, "training crop window and evaluation cut, frames", check=AT_LEAST_1)
    shuffle_buffer: int = option(1000, "samples held per worker for shuffling; 0 or 1: no shuffle", check=NON_NEGATIVE)
    max_text_len: int = option(64, "tokens per caption, [CLS]/[SEP] included", check=AT_LEAST_1)
    strict: bool = option(False, "a corrupt sample stops the run (true) or is skipped and counted (false)")
    # the odd corrupt sample is skipped; more than this share of the samples read (all ranks,
    # checked at logged steps and epoch ends from 100 samples on) stops the run
    max_bad_fraction: float = option(0.001, "with strict=false: stop once skipped bad samples exceed this "
                                            "fraction of the samples read", check=FRACTION)
    length_buckets: int = option(0, "n > 1: batches from pools of n sorted by length (changes the negatives)",
                                 check=NON_NEGATIVE)
    leaks: str = option("auto", "train motions that duplicate a val/test motion of any source: drop them, report "
                                "them (RUN_DIR/leaks.json), or off; auto: drop with several sources, off for one",
                        choices=LEAK_ACTIONS)

    def check(self) -> None:
        if self.shards is not None and self.sources:
            raise ConfigError("set data.shards or data.sources, not both (data.shards names one corpus, "
                              "data.sources several)")
        names = [source.name for source in self.sources]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ConfigError(f"data.sources: two sources are named {twice[0]!r}; give each its own name")
        if self.eval_source is not None and self.eval_source not in names:
            raise ConfigError(f"data.eval_source={self.eval_source!r} names no source (data.sources: "
                              f"{', '.join(names) or 'none'})")


def data_sources(data: DataSection) -> list[SourceSection]:
    """The corpora trained on: data.sources, or data.shards as the one source of weight 1."""
    if data.sources:
        return list(data.sources)
    if data.shards is None:
        raise ConfigError("no training data: set data.shards (one shard folder) or data.sources")
    return [SourceSection(shards=data.shards)]


def eval_shards(data: DataSection) -> str | None:
    """The shard set validation and evaluation read: data.shards (a command pointed at another
    shard set sets it), else the eval source's; None when neither is set."""
    if data.shards is not None or not data.sources:
        return data.shards
    sources = data_sources(data)
    name = data.eval_source or sources[0].name
    return next(source.shards for source in sources if source.name == name)


@dataclass
class ModelSection(Section):
    key: ClassVar[str] = "model"
    text_model: Optional[str] = option(None, "Hugging Face encoder: hub name or local folder; "
                                             "unset: the embedded all-MiniLM-L6-v2")
    pooling: str = option("auto", "LM pooling; auto: mean for sentence-transformers, else [CLS]", choices=POOLINGS)
    text_layers: Optional[int] = option(None, "keep only the first N LM layers (fast tests)", check=AT_LEAST_1)
    text_dropout: Optional[float] = option(None, "LM dropout when fine-tuning; unset: the model's own", check=PROBABILITY)
    finetune_lm: bool = option(False, "train the language model too")
    lm_unfreeze_step: int = option(0, "with finetune_lm: the LM's lr stays 0 until this optimizer step", check=NON_NEGATIVE)
    text_cache: bool = option(True, "frozen LM: compute each training caption's LM features once and cache them")
    text_cache_dir: Optional[str] = option(None, "text-cache folder; unset: <shards>/text-cache if writable, "
                                                 "else <run.root>/text-cache")
    d_model: int = option(256, "motion transformer width", check=AT_LEAST_1)
    layers: int = option(3, "motion transformer layers", check=AT_LEAST_1)
    heads: int = option(4, "motion transformer attention heads", check=AT_LEAST_1)
    ff: int = option(1024, "motion transformer feed-forward width", check=AT_LEAST_1)
    dropout: float = option(0.1, "motion transformer dropout", check=PROBABILITY)
    activation: str = option("gelu", "motion transformer activation", choices=ACTIVATIONS)
    embed_dim: int = option(1024, "joint embedding space dimension", check=AT_LEAST_1)
    # Same embeddings and batches, less padding; 0 = auto: 8 on CPU, 1 (off) on GPUs, where the
    # extra launches cost more than the padding saves (benchmarks.md)
    length_chunks: int = option(0, "motion tower: length-sorted row groups per batch; 0: auto (8 on CPU, off on GPUs)",
                                check=NON_NEGATIVE)
    text_length_chunks: int = option(0, "language model: length-sorted caption groups; 0: auto (4 on CPU, off on GPUs)",
                                     check=NON_NEGATIVE)
    compile: bool = option(False, "torch.compile the motion tower (slower on CPU)")


@dataclass
class LossConfig(Section):
    """Which loss, its settings and the warm-up schedule (the objective's own config).

    threshold_mode "symmetric" drops j when cos(m_i, m_j) > threshold_motion or
    cos(t_i, t_j) > threshold_text, in both directions. "per_direction" is the original
    MMAsia code: the anchor's own modality is compared with threshold_anchor and the
    candidate's modality with threshold_candidate. Warm-up counts are 0-based: step (epoch)
    < warmup_steps (warmup_epochs) uses warmup_loss; set at most one of the two. reduction
    "mean" divides by the batch; "sum" keeps the paper's batch-size-dependent sum.
    """

    key: ClassVar[str] = "loss"
    name: str = option("droptriple", "loss after the warm-up", choices=LOSS_NAMES)
    margin: float = option(0.2, "hinge margin (sh, mh, droptriple)", check=NON_NEGATIVE)
    threshold_motion: float = option(0.75, "droptriple, symmetric: drop a candidate whose motion is this similar", check=COSINE)
    threshold_text: float = option(0.75, "droptriple, symmetric: drop a candidate whose caption is this similar", check=COSINE)
    threshold_mode: str = option("symmetric", "droptriple: one threshold per modality, or per_direction "
                                              "(the MMAsia code: anchor/candidate thresholds)", choices=THRESHOLD_MODES)
    threshold_anchor: float = option(0.7, "droptriple, per_direction: threshold on the anchor's own modality", check=COSINE)
    threshold_candidate: float = option(0.9, "droptriple, per_direction: threshold on the candidate's modality", check=COSINE)
    warmup_loss: str = option("sh", "loss during the warm-up", choices=LOSS_NAMES)
    warmup_steps: int = option(0, "optimizer steps of warm-up loss (set this or warmup_epochs)", check=NON_NEGATIVE)
    warmup_epochs: int = option(0, "epochs of warm-up loss (set this or warmup_steps)", check=NON_NEGATIVE)
    chunk_size: int = option(0, "loss columns per chunk; 0: auto (~4M score cells per chunk)", check=NON_NEGATIVE)
    temperature: float = option(0.07, "InfoNCE initial temperature (learnable)", check=POSITIVE)
    reduction: str = option("mean", "mean over the batch, or the paper's sum", choices=REDUCTIONS)
    implementation: str = option("chunked", "loss kernels; dense: the B x G reference (tests and benchmarks)",
                                 choices=LOSS_IMPLEMENTATIONS)

    def check(self) -> None:
        if self.warmup_steps and self.warmup_epochs:
            raise ConfigError(f"set the warm-up in steps or in epochs, not both (got loss.warmup_steps="
                              f"{self.warmup_steps}, loss.warmup_epochs={self.warmup_epochs})")


@dataclass
class TrainSection(Section):
    key: ClassVar[str] = "train"
    epochs: int = option(10, "passes over the training motions (one caption drawn per visit)", check=AT_LEAST_1)
    max_steps: Optional[int] = option(None, "stop after this many optimizer steps; unset: no limit", check=AT_LEAST_1)
    batch_size: int = option(32, "samples per process and per optimizer step", check=AT_LEAST_1)
    # GradCache (rehamot/loss/grad_cache.py): the loss still sees every negative of the global batch
    micro_batches: int = option(1, "GradCache: split each step's batch into k micro-batches (DDP only)", check=AT_LEAST_1)
    lr: float = option(2e-4, "learning rate of the motion tower and the heads", check=POSITIVE)
    lm_lr: float = option(2e-5, "learning rate of a fine-tuned language model", check=NON_NEGATIVE)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay", check=NON_NEGATIVE)
    # one fused kernel per parameter group: 7.6x faster a step over 26M parameters (benchmarks.md)
    fused_adamw: bool = option(True, "fused AdamW implementation")
    grad_clip: float = option(0.0, "max global gradient norm; 0 disables", check=NON_NEGATIVE)
    schedule: str = option("step", "learning-rate schedule", choices=SCHEDULES)
    lr_warmup_steps: int = option(0, "linear learning-rate warm-up, optimizer steps", check=NON_NEGATIVE)
    decay_steps: list[int] = option(help="step schedule: multiply the lr by decay_factor at each of these steps",
                                    factory=list)
    decay_factor: float = option(0.1, "step schedule: the factor", check=POSITIVE)
    log_every: int = option(10, "optimizer steps between logged records", check=AT_LEAST_1)
    val_every: int = option(0, "optimizer steps between validations; 0: at the end of every epoch", check=NON_NEGATIVE)
    save_every: int = option(0, "optimizer steps between checkpoints; 0: at the end of every epoch", check=NON_NEGATIVE)
    keep_checkpoints: int = option(2, "checkpoints kept (the newest ones)", check=AT_LEAST_1)
    nonfinite: str = option("skip", "a NaN/inf loss on any rank: skip the step on all ranks, or stop",
                            choices=NONFINITE_ACTIONS)
    collective_timeout_s: int = option(300, "a dead rank makes the others fail after this many seconds", check=AT_LEAST_1)
    eval_batch_size: int = option(128, "batch size of validation and evaluation encoding", check=AT_LEAST_1)
    # 0: the cores this process may use (affinity, SLURM_CPUS_PER_TASK, shared by the node's
    # processes) minus its loader workers; OMP_NUM_THREADS, when set, wins over auto
    threads: int = option(0, "intra-op CPU threads per process; 0: auto (usable cores minus loader workers)",
                          check=NON_NEGATIVE)

    def check(self) -> None:
        if self.batch_size % self.micro_batches:
            raise ConfigError(f"train.micro_batches={self.micro_batches}: must divide train.batch_size="
                              f"{self.batch_size} (each step's batch is split evenly)")


@dataclass
class Config(Section):
    run: RunSection = option(help="", factory=RunSection)
    data: DataSection = option(help="", factory=DataSection)
    model: ModelSection = option(help="", factory=ModelSection)
    loss: LossConfig = option(help="", factory=LossConfig)
    train: TrainSection = option(help="", factory=TrainSection)
    seed: int = option(1234, "seed of the data order, crops, captions and initialisation", check=SEED_RANGE)
    resume: Optional[str] = option(None, "a checkpoint folder, or latest (none yet: start fresh)")


# A config file is a few KB; these bound what a hostile or broken one can cost to read.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 20  # nesting of mappings and lists
MAX_CONFIG_VALUES = 10_000  # keys, items and scalars, each alias counted as the values it stands for


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe subset (mappings, lists, plain scalars), nested at most MAX_CONFIG_DEPTH deep:
    a `!!python/...` or any other unknown tag is an error, never an object."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_CONFIG_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_CONFIG_DEPTH} levels deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_undefined(self, node: yaml.Node) -> Any:
        raise yaml.constructor.ConstructorError(None, None, f"tag {node.tag!r} is not allowed in a config "
                                                "(plain values only)", node.start_mark)


_ConfigLoader.add_constructor(None, _ConfigLoader.construct_undefined)


def _too_big(data: Any) -> str | None:
    """Why `data`, its aliases expanded, is too big or too deep for a config (None: it is not).
    YAML aliases share one object, so "billion laughs" parses small and expands huge: the walk
    counts each alias as what it stands for, and stops at the first value past the bounds."""
    count, stack = 0, [(data, 1)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            return f"expands to more than {MAX_CONFIG_VALUES} values (aliases of aliases?)"
        if depth > MAX_CONFIG_DEPTH:
            return f"nested more than {MAX_CONFIG_DEPTH} levels deep once its aliases are expanded"
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item if isinstance(item, list) else []
        stack.extend((child, depth + 1) for child in children)
    return None


def _yaml_reason(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's mapping, read once and parsed with YAML's safe loader: a file over
    MAX_CONFIG_BYTES, invalid YAML, a tag, a top level that is not a mapping or aliases that
    expand past MAX_CONFIG_VALUES are a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" if not path.exists()
                          else f"config file {path} is not a regular file")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # never more, whatever the file's size
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot read it: {err.strerror or err}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is over {MAX_CONFIG_BYTES // (1 << 20)} MB: not a config")
    try:
        data = yaml.load(raw, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: {_yaml_reason(err)}") from None
    if data is None:  # an empty file
        return {}
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the single value {str(data)[:40]!r}"
        raise ConfigError(f"config file {path}: the top level must be a mapping of keys to values, not {kind}")
    reason = _too_big(data)
    if reason:
        raise ConfigError(f"config file {path}: {reason}")
    return data


def _config_key_error(err: OmegaConfBaseException, where: str = "") -> ConfigError:
    key = getattr(err, "full_key", None)
    reason = str(getattr(err, "msg", err)).splitlines()[0]
    return ConfigError(f"{where}config key {key!r}: {reason}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults, then the YAML file (if any), then `key=value` overrides."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        data = read_config_file(path)
        try:  # OmegaConf gets plain data, never the file: its own loader has none of the bounds above
            merged = OmegaConf.merge(merged, OmegaConf.create(data))
        except OmegaConfBaseException as err:
            raise _config_key_error(err, f"config file {path}: ") from None
    try:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]  (runs the sections' checks)
    except OmegaConfBaseException as err:
        raise _config_key_error(err) from None
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def schema_options(section: type | None = None, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted key, default, help) of every option of the schema, in declaration order; the help
    of a choice option ends with its allowed values."""
    for f in fields(section or Config):
        key = f"{prefix}{f.name}"
        if f.default_factory is not NO_DEFAULT and is_dataclass(f.default_factory):  # a section
            yield from schema_options(f.default_factory, f"{key}.")  # type: ignore[arg-type]
            continue
        default = f.default_factory() if f.default_factory is not NO_DEFAULT else f.default
        yield key, default, _with_choices(f.metadata.get("help", ""), f.metadata.get("choices"))


def _with_choices(help_: str, choices: Sequence[str] | None) -> str:
    return f"{help_} [{' | '.join(choices)}]" if choices else help_


def options_help() -> str:
    """Every config key with its default and one line of help, for `--help`."""
    rows = [(key, "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default),
             help_) for key, default, help_ in schema_options()]
    width = max(len(k) + len(d) for k, d, _ in rows) + 3
    return "\n".join(f"  {f'{k}={d}':<{width}} {h}" for k, d, h in rows)


C = TypeVar("C")


def build_component(cls: type[C], section: object, renamed: Mapping[str, str] | None = None, **given: Any) -> C:
    """A component's config from its schema section: each field is taken from `given`, else
    from the section's option of the same name (or `renamed[field]`). A component field with
    neither is an error, so every component option has a schema key."""
    kwargs = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in given:
            kwargs[f.name] = given[f.name]
            continue
        key = (renamed or {}).get(f.name, f.name)
        if not hasattr(section, key):
            raise TypeError(f"{cls.__name__}.{f.name} has no schema key in {type(section).__name__} "
                            "(add an option there, or pass it explicitly)")
        kwargs[f.name] = getattr(section, key)
    unknown = set(given) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return cls(**kwargs)
