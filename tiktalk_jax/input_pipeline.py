"""grain input pipeline: dialogues (+ side tables) -> per-model formatted, host-sharded batches.

Data flow for one host (all of it deterministic given the seed, the host and the host count):

    record indices of the split (dialogues whose side-table keys all exist)
      -> host shard            indices[process_index::process_count] (disjoint, covers the split)
      -> train: shuffle(seed) then repeat (grain reshuffles every epoch: seed + epoch)
         eval:  in order, padded with -1 to the same number of batches on every host
      -> batch of indices      local batch = global batch / process_count (train drops remainder)
      -> load + join + format  one grain map per batch: read the records (`__getitems__` when the
                               source has it), attach side-table records by key, and apply the
                               model family's formatter -> dict of fixed-shape numpy arrays
      -> to_iter_dataset       (+ optional mp_prefetch worker processes)

Batching indices before reading lets one transform see a whole batch: the source reads it in one
`__getitems__` call and the formatter tokenizes all its strings in one call into the Rust
tokenizer. On 2 cores (benchmarks/input_pipeline.py) the dialogue_text formatter does ~22k
examples/s that way vs ~20k with one call per string and ~17k through the HF tokenizer's
__call__; reading is the other half of the cost, hence `TextRecords` (~3x the TFDS decoder) for
text-only splits. Every batch also carries `example_mask: bool[B]`
(False on eval padding) and `record_index: int32[B]` (index in the split, -1 on padding; eval uses
it to look up reference strings, which never travel in a batch).

The iterator is a grain `DatasetIterator`: `it.get_state()` is a small JSON-serialisable dict (also
with worker processes) and `it.set_state(state)` resumes at exactly the next batch. The shard
depends on the host count: resume with the same number of hosts.

Side tables. A side table is a random-access source of records with a key field (media or
features per `video_id`, knowledge per `dialogue_id`), joined through a key -> record index map
built once when the pipeline is built (pass `keys=` to skip reading the table for it). The joined
record appears under `record[table.name]`. A dialogue whose key is missing from a table is, by
`on_missing`:
  * "error" (default): a KeyError naming the table, the key and the dialogue, raised when the
    pipeline is built (a missing key means the side table was built from other data: fail fast).
  * "skip": the dialogue is dropped before sharding (so every host agrees on the split); the
    dropped dialogue ids are logged and returned in `Datasets.skipped` / by `join_indices`.
Both read the join field of every dialogue once when the pipeline is built.

Configuration (`config.input`, see `default_config()`):
  data_dir            TFDS data dir holding `tiktalk/dialogues/<version>` (None: TFDS default).
  dataset             "tiktalk/dialogues".
  train_split         "train".
  eval_splits         splits to build eval pipelines for, e.g. ("val", "test").
  batch_size          GLOBAL train batch size (divided evenly among hosts).
  eval_batch_size     GLOBAL eval batch size.
  seed                shuffle seed.
  num_epochs          None repeats forever; an int stops after that many epochs.
  formatter           formatter name; None uses `config.model.name`.
  tokenizer           local HF tokenizer dir or vocab.txt; None trains/reuses `vocab.txt` in
                      `vocab_dir` (see tiktalk_jax/tokenizer.py).
  vocab_dir           where a trained vocab.txt lives; None: the dataset's version dir.
  vocab_size          upper bound of a trained vocab.
  max_context_len     tokens of the joined context, [CLS] and [SEP]s included.
  max_response_len    tokens of a response, [CLS] and [SEP] included.
  num_references      eval: references per dialogue in `references_ids` (0: none).
  on_missing          "error" | "skip" for side-table keys (above).
  num_workers         grain worker processes (0: in the main process).
  worker_buffer_size  batches each worker keeps ready.
  read_threads        threads of the in-process prefetch (0 reads on the calling thread).
  prefetch_buffer     batches the in-process prefetch keeps ready.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from tiktalk_jax import tokenizer as tokenizer_lib

Record = Mapping[str, Any]
Batch = dict[str, np.ndarray]
# A batched formatter maps a list of records to a dict of arrays with a leading batch dim.
BatchFormatter = Callable[[Sequence[Record]], Batch]
FormatterFactory = Callable[..., Any]

ON_MISSING = ("error", "skip")


def default_config() -> ml_collections.ConfigDict:
    """The `config.input` section with its defaults (documented in the module docstring)."""
    return ml_collections.ConfigDict(
        dict(
            data_dir=ml_collections.config_dict.placeholder(str),
            dataset="tiktalk/dialogues",
            train_split="train",
            eval_splits=("val",),
            batch_size=32,
            eval_batch_size=32,
            seed=0,
            num_epochs=ml_collections.config_dict.placeholder(int),
            formatter=ml_collections.config_dict.placeholder(str),
            tokenizer=ml_collections.config_dict.placeholder(str),
            vocab_dir=ml_collections.config_dict.placeholder(str),
            vocab_size=8000,
            max_context_len=128,
            max_response_len=32,
            num_references=5,
            on_missing="error",
            num_workers=0,
            worker_buffer_size=2,
            read_threads=1,
            prefetch_buffer=4,
        )
    )


# ---------------------------------------------------------------------------------------------
# Formatter registry.
# ---------------------------------------------------------------------------------------------

_FORMATTERS: dict[str, tuple[FormatterFactory, bool]] = {}


def register_formatter(name: str, *, batched: bool = False):
    """Registers a formatter factory under a model-family name.

    The factory is called as `factory(input_config, tokenizer, train=bool)` and returns either
      * batched=True: a callable `list[record] -> dict[str, array[B, ...]]`, or
      * batched=False: a callable `record -> dict[str, array[...]]` or a `grain.transforms.Map`
        (its `.map(record)` is used); the pipeline stacks the per-example dicts.
    All arrays must have the same shape for every record (pad/truncate to configured lengths).
    """

    def decorator(factory: FormatterFactory) -> FormatterFactory:
        if name in _FORMATTERS:
            raise ValueError(f"formatter {name!r} is already registered")
        _FORMATTERS[name] = (factory, batched)
        return factory

    return decorator


def registered_formatters() -> list[str]:
    return sorted(_FORMATTERS)


class _StackPerExample:
    """Adapts a per-example formatter to the batched interface (picklable for grain workers)."""

    def __init__(self, fn: Any):
        self._fn = fn.map if isinstance(fn, grain.transforms.Map) else fn

    def __call__(self, records: Sequence[Record]) -> Batch:
        examples = [self._fn(r) for r in records]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def get_formatter(
    name: str, input_config: ml_collections.ConfigDict, tokenizer: Any, *, train: bool
) -> BatchFormatter:
    """Builds the registered formatter `name` as a batched callable."""
    if name not in _FORMATTERS:
        raise KeyError(f"unknown formatter {name!r}; registered: {registered_formatters()}")
    factory, batched = _FORMATTERS[name]
    fn = factory(input_config, tokenizer, train=train)
    return fn if batched else _StackPerExample(fn)


def as_text(value: Any) -> str:
    """TFDS data sources give Text features as bytes; in-memory records use str."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class _Encoder:
    """Batch encoding with the Rust tokenizer behind a HF fast tokenizer (no special tokens)."""

    def __init__(self, tokenizer: Any):
        # HF fast tokenizers wrap a `tokenizers.Tokenizer`; calling it directly skips the
        # Python-side BatchEncoding bookkeeping, which costs more than tokenizing short turns.
        self.backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        ids = {t: self.backend.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]")}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer vocabulary lacks {missing}")
        self.pad_id, self.cls_id, self.sep_id = ids["[PAD]"], ids["[CLS]"], ids["[SEP]"]

    def encode(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never use: about
        # 20% faster than encode_batch on short Chinese turns.
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]


@register_formatter("dialogue_text", batched=True)
class DialogueText:
    """Generic text formatter: context and response token ids for any text-only model.

    Outputs (B = batch, Lc = max_context_len, Lr = max_response_len, R = num_references):
      context_ids   int32[B, Lc]  `[CLS] turn_1 [SEP] ... turn_n [SEP]`, [PAD]-padded. When too
                                  long, the OLDEST turns are dropped (the reply answers the latest);
                                  if the latest turn alone overflows, its last tokens are kept.
      context_mask  bool[B, Lc]
      response_ids  int32[B, Lr]  `[CLS] response [SEP]` of the first response ([CLS] is the
                                  decoder's start token; a truncated response still ends in [SEP]).
      response_mask bool[B, Lr]
      eval only, when num_references > 0:
      references_ids  int32[B, R, Lr], references_mask bool[B, R, Lr]: the first R responses
                      (val/test have 5), all-[PAD] rows where a record has fewer.
    """

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any, *, train: bool):
        self.max_context_len = int(config.max_context_len)
        self.max_response_len = int(config.max_response_len)
        if self.max_context_len < 3 or self.max_response_len < 3:
            raise ValueError("max_context_len and max_response_len must be at least 3")
        self.num_references = 0 if train else int(config.get("num_references", 0))
        self.encoder = _Encoder(tokenizer)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.encoder.encode(texts)

    def _context(self, turns: list[list[int]], out: np.ndarray) -> int:
        """Writes `[CLS] turns... [SEP]` into `out[:n]`, keeping the latest turns; returns n."""
        budget = self.max_context_len - 1  # [CLS]
        kept: list[list[int]] = []
        for turn in reversed(turns):
            need = len(turn) + 1  # the turn and its [SEP]
            if need <= budget:
                kept.append(turn)
                budget -= need
            else:
                if not kept:  # the latest turn alone is too long: keep its end
                    kept.append(turn[len(turn) - (budget - 1) :] if budget > 1 else [])
                break
        ids = [self.encoder.cls_id]
        for turn in reversed(kept):
            ids.extend(turn)
            ids.append(self.encoder.sep_id)
        out[: len(ids)] = ids
        return len(ids)

    def _response(self, tokens: list[int], out: np.ndarray) -> int:
        body = tokens[: self.max_response_len - 2]
        ids = [self.encoder.cls_id, *body, self.encoder.sep_id]
        out[: len(ids)] = ids
        return len(ids)

    def __call__(self, records: Sequence[Record]) -> Batch:
        b, n_refs = len(records), max(self.num_references, 1)
        texts: list[str] = []
        spans = []  # per record: (start, n_turns, n_responses) into `texts`
        for r in records:
            turns = [as_text(t) for t in r["context"]]
            responses = [as_text(t) for t in list(r["responses"])[:n_refs]]
            spans.append((len(texts), len(turns), len(responses)))
            texts.extend(turns)
            texts.extend(responses)
        tokens = self._encode(texts)

        pad = self.encoder.pad_id
        context = np.full((b, self.max_context_len), pad, np.int32)
        context_len = np.zeros((b,), np.int32)
        refs = np.full((b, n_refs, self.max_response_len), pad, np.int32)
        refs_len = np.zeros((b, n_refs), np.int32)
        for i, (start, n_turns, n_resp) in enumerate(spans):
            context_len[i] = self._context(tokens[start : start + n_turns], context[i])
            for j in range(n_resp):
                refs_len[i, j] = self._response(tokens[start + n_turns + j], refs[i, j])
        ctx_mask = np.arange(self.max_context_len) < context_len[:, None]
        refs_mask = np.arange(self.max_response_len) < refs_len[..., None]
        batch = {
            "context_ids": context,
            "context_mask": ctx_mask,
            "response_ids": refs[:, 0].copy(),
            "response_mask": refs_mask[:, 0].copy(),
        }
        if self.num_references:
            batch["references_ids"] = refs
            batch["references_mask"] = refs_mask
        return batch


# ---------------------------------------------------------------------------------------------
# Side tables.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SideTable:
    """A random-access table joined to dialogues by key.

    Attributes:
      name: the joined record appears as `record[name]`.
      source: random-access records (`tfds.data_source`, a list of dicts, ...).
      key: the key field of the side records (e.g. "video_id").
      join_on: the field of the dialogue holding the key; defaults to `key`.
      keys: the keys of `source` in record order, when known (e.g. cached next to the data); saves
        reading every side record (media records hold frames) to build the index.
    """

    name: str
    source: Sequence[Record]
    key: str
    join_on: str | None = None
    keys: Sequence[str] | None = None
    _index: dict[str, int] | None = dataclasses.field(default=None, repr=False)

    @property
    def dialogue_field(self) -> str:
        return self.join_on or self.key

    def index(self) -> dict[str, int]:
        """key -> record index, built on first use (duplicate keys are an error)."""
        if self._index is None:
            keys = self.keys
            if keys is None:
                keys = [self.source[i][self.key] for i in range(len(self.source))]
            if len(keys) != len(self.source):
                raise ValueError(
                    f"side table {self.name!r}: {len(keys)} keys for {len(self.source)} rows"
                )
            index: dict[str, int] = {}
            for i, k in enumerate(keys):
                k = as_text(k)
                if k in index:
                    raise ValueError(
                        f"side table {self.name!r}: duplicate key {k!r} (rows {index[k]}, {i})"
                    )
                index[k] = i
            self._index = index
        return self._index


def dialogue_video_ids(input_config: ml_collections.ConfigDict, split: str) -> set[str]:
    """The video ids the dialogues of `split` refer to (`input_config.data_dir` / `dataset`): a
    per-video side table must answer for each of them (see `maria.WithEmptyRecords`)."""
    source = open_split(dataset_dir(input_config.data_dir, input_config.dataset), split)
    ids: set[str] = set()
    for start in range(0, len(source), 4096):  # batched reads: one ArrayRecord call per chunk
        chunk = source.__getitems__(list(range(start, min(start + 4096, len(source)))))
        ids.update(as_text(r["video_id"]) for r in chunk)
    return ids


def join_indices(
    source: Sequence[Record], side_tables: Sequence[SideTable], on_missing: str = "error"
) -> tuple[np.ndarray, list[str]]:
    """Indices of `source` whose join keys exist in every side table, and the skipped dialogue ids.

    With on_missing="error" a missing key raises a KeyError instead (see the module docstring).
    """
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")
    n = len(source)
    if not side_tables:
        return np.arange(n, dtype=np.int64), []
    indexes = [(t, t.index()) for t in side_tables]
    keep, skipped = [], []
    for i in range(n):
        record = source[i]
        missing = [t for t, idx in indexes if as_text(record[t.dialogue_field]) not in idx]
        if not missing:
            keep.append(i)
            continue
        dialogue_id = as_text(record.get("dialogue_id", i))
        if on_missing == "error":
            t = missing[0]
            key = as_text(record[t.dialogue_field])
            raise KeyError(
                f"dialogue {dialogue_id!r}: {t.dialogue_field}={key!r} not found in side table "
                f"{t.name!r} ({len(t.source)} rows); rebuild the table from the same data or pass "
                "on_missing='skip'"
            )
        skipped.append(dialogue_id)
    if skipped:
        logging.warning(
            "Skipped %d of %d dialogues with keys missing from side tables %s; first: %s",
            len(skipped),
            n,
            [t.name for t in side_tables],
            skipped[:5],
        )
    return np.asarray(keep, dtype=np.int64), skipped


# ---------------------------------------------------------------------------------------------
# The pipeline.
# ---------------------------------------------------------------------------------------------


class _LoadJoinFormat:
    """grain map over a batch of record indices (-1 = eval padding) -> formatted batch."""

    def __init__(
        self,
        source: Sequence[Record],
        side_tables: Sequence[SideTable],
        formatter: BatchFormatter,
        pad_index: int,
    ):
        self.source = source
        # Only the built index and the source travel to grain workers.
        self.tables = [(t.name, t.dialogue_field, t.source, t.index()) for t in side_tables]
        self.formatter = formatter
        self.pad_index = pad_index

    def _read(self, source: Sequence[Record], indices: list[int]) -> list[Record]:
        getitems = getattr(source, "__getitems__", None)
        if getitems is not None:
            return list(getitems(indices))
        return [source[i] for i in indices]

    def __call__(self, indices: np.ndarray) -> Batch:
        valid = indices >= 0
        # Padding slots format a real record (so shapes and dtypes match) and are masked out.
        read = [int(i) if v else self.pad_index for i, v in zip(indices, valid)]
        records = [dict(r) for r in self._read(self.source, read)]
        for name, field, table, index in self.tables:
            rows = [index[as_text(r[field])] for r in records]
            for r, side in zip(records, self._read(table, rows)):
                r[name] = side
        batch = self.formatter(records)
        batch["example_mask"] = valid
        batch["record_index"] = np.where(valid, indices, -1).astype(np.int32)
        return batch


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} not in [0, {count})")
    return index, count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} not divisible by {process_count} hosts")
    return global_batch_size // process_count


def _to_iter(
    ds: grain.MapDataset,
    *,
    num_workers: int,
    worker_buffer_size: int,
    read_threads: int,
    prefetch_buffer: int,
) -> grain.IterDataset:
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer)
    )
    if num_workers > 0:
        # grain's worker processes read absl flags; outside an absl app (tests, notebooks) they are
        # unparsed and grain would fail, so fall back to the flag defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=worker_buffer_size
            )
        )
    return it


def train_dataset(
    source: Sequence[Record],
    formatter: BatchFormatter,
    *,
    global_batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    side_tables: Sequence[SideTable] = (),
    on_missing: str = "error",
    num_workers: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 1,
    prefetch_buffer: int = 4,
    indices: np.ndarray | None = None,
) -> grain.IterDataset:
    """Shuffled, repeated, host-sharded training batches of `global_batch_size / process_count`.

    `indices` (from `join_indices`) skips the side-table key check when already done.
    Batches: the formatter's arrays plus `example_mask` (all True) and `record_index`, all [B, ...].
    """
    pi, pc = _host(process_index, process_count)
    local_bs = _local_batch_size(global_batch_size, pc)
    if indices is None:
        indices, _ = join_indices(source, side_tables, on_missing)
    host_indices = indices[pi::pc]
    if len(host_indices) == 0:
        raise ValueError(
            f"host {pi} of {pc} gets no training examples ({len(indices)} in the split)"
        )
    ds = grain.MapDataset.source(host_indices).shuffle(seed).repeat(num_epochs)
    ds = ds.batch(local_bs, drop_remainder=True, batch_fn=np.asarray)
    ds = ds.map(_LoadJoinFormat(source, side_tables, formatter, pad_index=int(indices[0])))
    return _to_iter(
        ds,
        num_workers=num_workers,
        worker_buffer_size=worker_buffer_size,
        read_threads=read_threads,
        prefetch_buffer=prefetch_buffer,
    )


def num_eval_batches(num_examples: int, global_batch_size: int, process_count: int) -> int:
    """Batches every host yields for an eval split: enough for the largest host shard."""
    local_bs = _local_batch_size(global_batch_size, process_count)
    return math.ceil(math.ceil(num_examples / process_count) / local_bs)


def eval_dataset(
    source: Sequence[Record],
    formatter: BatchFormatter,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    side_tables: Sequence[SideTable] = (),
    on_missing: str = "error",
    num_workers: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 1,
    prefetch_buffer: int = 4,
    indices: np.ndarray | None = None,
) -> grain.IterDataset:
    """One in-order pass over the split; every host yields `num_eval_batches(...)` batches.

    The last batches are padded with a copy of a real record whose `example_mask` is False and
    `record_index` is -1; a metric must weight examples by `example_mask`.
    """
    pi, pc = _host(process_index, process_count)
    local_bs = _local_batch_size(global_batch_size, pc)
    if indices is None:
        indices, _ = join_indices(source, side_tables, on_missing)
    n_batches = num_eval_batches(len(indices), global_batch_size, pc)
    padded = np.full((n_batches * local_bs,), -1, np.int64)
    host_indices = indices[pi::pc]
    padded[: len(host_indices)] = host_indices
    ds = grain.MapDataset.source(padded).batch(local_bs, batch_fn=np.asarray)
    pad_index = int(indices[0]) if len(indices) else 0
    ds = ds.map(_LoadJoinFormat(source, side_tables, formatter, pad_index=pad_index))
    return _to_iter(
        ds,
        num_workers=num_workers,
        worker_buffer_size=worker_buffer_size,
        read_threads=read_threads,
        prefetch_buffer=prefetch_buffer,
    )


# ---------------------------------------------------------------------------------------------
# From a config: TFDS sources, tokenizer, formatter.
# ---------------------------------------------------------------------------------------------


def dataset_dir(data_dir: str | None, name: str = "tiktalk/dialogues") -> str:
    """The newest prepared version directory `<data_dir>/<name>/<version>` of a TFDS dataset."""
    import tensorflow_datasets as tfds

    root = os.path.join(data_dir or tfds.core.constants.DATA_DIR, name)
    versions = []
    if os.path.isdir(root):
        for v in os.listdir(root):
            parts = v.split(".")
            ok = len(parts) == 3 and all(p.isdigit() for p in parts)
            if ok and os.path.exists(os.path.join(root, v, "dataset_info.json")):
                versions.append(tuple(int(p) for p in parts))
    if not versions:
        raise FileNotFoundError(f"no prepared dataset under {root} (build it first: see README)")
    return os.path.join(root, ".".join(map(str, max(versions))))


class TextRecords:
    """Fast reader of a text-only TFDS ArrayRecord split (e.g. `tiktalk/dialogues`).

    Gives the same records as the `tfds` data source (Text -> bytes, Sequence(Text) -> list of
    bytes) but parses the stored tf.train.Example directly: about 3x faster than TFDS's generic
    decoder, which made reading the slowest stage of the dialogues pipeline. Use `supports()` to
    check that every feature is Text or Sequence(Text); anything else needs the tfds source.
    """

    def __init__(self, tfds_source: Any):
        if not self.supports(tfds_source):
            raise ValueError("TextRecords reads only Text and Sequence(Text) features")
        features = tfds_source.dataset_info.features
        self.scalars = [k for k, f in features.items() if not hasattr(f, "feature")]
        self.sequences = [k for k, f in features.items() if hasattr(f, "feature")]
        self.raw = tfds_source.data_source

    @staticmethod
    def supports(tfds_source: Any) -> bool:
        import tensorflow_datasets as tfds

        info = getattr(tfds_source, "dataset_info", None)
        if info is None or not hasattr(tfds_source, "data_source"):
            return False
        text, seq = tfds.features.Text, tfds.features.Sequence
        return all(
            isinstance(f, text) or (isinstance(f, seq) and type(f.feature) is text)
            for f in info.features.values()
        )

    def _decode(self, serialized: bytes) -> dict[str, Any]:
        from tensorflow_datasets.proto import tf_example_pb2

        feature = tf_example_pb2.Example.FromString(serialized).features.feature
        record: dict[str, Any] = {k: feature[k].bytes_list.value[0] for k in self.scalars}
        for k in self.sequences:
            record[k] = list(feature[k].bytes_list.value) if k in feature else []
        return record

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._decode(self.raw[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self._decode(r) for r in self.raw.__getitems__(indices)]


def open_split(version_dir: str, split: str, *, fast_text: bool = True) -> Sequence[Record]:
    """A random-access source over a prepared ArrayRecord split (no builder code needed).

    Text-only datasets get the `TextRecords` reader when `fast_text`; others the `tfds` one.
    """
    import tensorflow_datasets as tfds

    source = tfds.builder_from_directory(version_dir).as_data_source(split=split)
    if fast_text and TextRecords.supports(source):
        return TextRecords(source)
    return source


@dataclasses.dataclass
class Datasets:
    """What `make_datasets` returns.

    Attributes:
      train: training batches (infinite unless num_epochs is set).
      evals: split -> one eval pass.
      eval_sources: split -> the eval source (reference strings via `record_index`).
      num_eval_batches: split -> batches per host.
      tokenizer: the HF tokenizer used.
      skipped: split -> dialogue ids dropped by on_missing="skip".
    """

    train: grain.IterDataset | None
    evals: dict[str, grain.IterDataset]
    eval_sources: dict[str, Sequence[Record]]
    num_eval_batches: dict[str, int]
    tokenizer: Any
    skipped: dict[str, list[str]]


def make_datasets(
    config: ml_collections.ConfigDict,
    *,
    side_tables: Mapping[str, Sequence[SideTable]] | None = None,
    sources: Mapping[str, Sequence[Record]] | None = None,
    train: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Datasets:
    """Builds the train and eval pipelines described by `config.input` (+ `config.model.name`).

    Args:
      config: the full config; reads `config.input` and `config.model.name`.
      side_tables: split -> side tables to join (e.g. features per video_id).
      sources: split -> an already opened source that replaces that split's dialogues (tests,
        a family's own records such as BLIP-2's caption pairs); the other splits are opened
        from `cfg.data_dir`. The tokenizer is always the dialogues' (`cfg.vocab_dir`, the
        dataset's vocabulary, or one trained on the train dialogues).
      train: False builds only the eval pipelines.
      process_index, process_count: default to jax's.
    """
    cfg = config.input
    sources = dict(sources or {})
    version_dir = None
    if not sources or cfg.get("data_dir"):
        version_dir = dataset_dir(cfg.data_dir, cfg.dataset)
    splits = ([cfg.train_split] if train else []) + list(cfg.eval_splits)

    def source(split):
        if split in sources:
            return sources[split]
        if version_dir is None:
            raise ValueError(f"no source for split {split!r} and no config.input.data_dir")
        return open_split(version_dir, split)

    def dialogues_for_vocab():
        split = cfg.train_split
        return open_split(version_dir, split) if version_dir is not None else source(split)

    opened = {s: source(s) for s in dict.fromkeys(splits)}
    tok = tokenizer_lib.load_tokenizer(
        cfg.tokenizer,
        cfg.vocab_dir or version_dir,
        texts=lambda: tokenizer_lib.dialogue_texts(dialogues_for_vocab()),
        vocab_size=cfg.vocab_size,
    )
    name = cfg.formatter or config.model.name
    pipeline_args = dict(
        process_index=process_index,
        process_count=process_count,
        num_workers=cfg.num_workers,
        worker_buffer_size=cfg.worker_buffer_size,
        read_threads=cfg.read_threads,
        prefetch_buffer=cfg.prefetch_buffer,
    )
    side_tables = side_tables or {}
    skipped, indices = {}, {}
    for split, src in opened.items():
        indices[split], skipped[split] = join_indices(
            src, side_tables.get(split, ()), cfg.on_missing
        )

    train_ds = None
    if train:
        split = cfg.train_split
        train_ds = train_dataset(
            opened[split],
            get_formatter(name, cfg, tok, train=True),
            global_batch_size=cfg.batch_size,
            seed=cfg.seed,
            num_epochs=cfg.num_epochs,
            side_tables=side_tables.get(split, ()),
            indices=indices[split],
            **pipeline_args,
        )
    evals, n_batches = {}, {}
    _, pc = _host(process_index, process_count)
    for split in cfg.eval_splits:
        evals[split] = eval_dataset(
            opened[split],
            get_formatter(name, cfg, tok, train=False),
            global_batch_size=cfg.eval_batch_size,
            side_tables=side_tables.get(split, ()),
            indices=indices[split],
            **pipeline_args,
        )
        n_batches[split] = num_eval_batches(len(indices[split]), cfg.eval_batch_size, pc)
    return Datasets(
        train=train_ds,
        evals=evals,
        eval_sources={s: opened[s] for s in cfg.eval_splits},
        num_eval_batches=n_batches,
        tokenizer=tok,
        skipped=skipped,
    )


# ---------------------------------------------------------------------------------------------
# Host batch -> global jax.Array.
# ---------------------------------------------------------------------------------------------


def make_global(
    batch: Mapping[str, np.ndarray],
    mesh: jax.sharding.Mesh,
    data_axes: Sequence[str] = ("data", "fsdp"),
) -> dict[str, jax.Array]:
    """Host-local batch [B_local, ...] -> global jax.Arrays [B_local * hosts, ...].

    The batch dimension is sharded over the mesh's `data_axes` that exist (others replicated);
    every other dimension is replicated. Works for Explicit and Auto mesh axes. The host batch
    must be shard `distributed.data_shard(mesh)` of the global batch (hosts holding the same
    rows, when a model axis spans hosts, pass the same data).
    """
    from tiktalk_jax import distributed

    axes = tuple(a for a in data_axes if a in mesh.axis_names)
    spec = jax.sharding.PartitionSpec(axes if axes else None)
    sharding = jax.sharding.NamedSharding(mesh, spec)
    _, shards = distributed.data_shard(mesh, tuple(data_axes))
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * shards, *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out
