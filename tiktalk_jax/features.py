"""The features dataset of `tiktalk_jax.extract`: layout, shard writer, random-access reader.

A features dataset is a directory (one encoder, one configuration):

    <features_dir>/metadata.json                encoder, weights (path + sha256, or
                                                "random-init seed=S"), preprocessing, dtypes,
                                                the fields of a record and their shapes
    <features_dir>/report.json                  extraction report: per split, videos written,
                                                failed (by reason) and noted (e.g. no audio)
    <features_dir>/<split>/h<HHH>-<SSSSS>.array_record   records of one shard (host H, number S)
    <features_dir>/<split>/h<HHH>-<SSSSS>.json           its index: the video ids written, in
                                                record order, and the failed ones

A shard is complete when its index exists: the index is written (atomically) only after the
ArrayRecord file was closed and renamed into place, so an interrupted run leaves at most an
unindexed shard, which readers ignore and the next run deletes. The done-list of a split is
the union of its indexes (written and failed videos), whatever host wrote them.

One record per video: a msgpack map (`flax.serialization`, which keeps bfloat16) of
`video_id: str` and numpy arrays; which arrays, is the encoder's business and is listed under
`fields` in metadata.json (see `tiktalk_jax.encoders`). `FeatureTable` reads them back as a
random-access sequence of dicts, the source interface `input_pipeline.SideTable` joins on:

    table = features.FeatureTable(features_dir, "train")
    side = table.side_table("frames")     # SideTable(name="frames", key="video_id", keys=...)
    table[0]["features"]                  # e.g. float[N_frames, 2048]
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import serialization

METADATA_NAME = "metadata.json"
REPORT_NAME = "report.json"
_SHARD_RE = re.compile(r"^h(\d{3,})-(\d{5,})\.json$")
# One record per chunk: random access reads exactly one record, never its neighbours.
_WRITER_OPTIONS = "group_size:1"


def encode_record(record: dict[str, Any]) -> bytes:
    """`{"video_id": str, name: np.ndarray | scalar}` -> bytes (msgpack, dtypes kept)."""
    return serialization.msgpack_serialize(
        {k: (v if isinstance(v, str) else np.asarray(v)) for k, v in record.items()}
    )


def decode_record(data: bytes) -> dict[str, Any]:
    return serialization.msgpack_restore(data)


def write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically (temp file + rename), so readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_metadata(features_dir: str) -> dict[str, Any]:
    path = os.path.join(features_dir, METADATA_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{features_dir!r} is not a features dataset (no {METADATA_NAME})")
    return read_json(path)


def shard_indexes(features_dir: str, split: str) -> list[dict[str, Any]]:
    """The indexes of the complete shards of `split`, sorted by file name (host, number)."""
    split_dir = os.path.join(features_dir, split)
    if not os.path.isdir(split_dir):
        return []
    names = sorted(n for n in os.listdir(split_dir) if _SHARD_RE.match(n))
    return [read_json(os.path.join(split_dir, n)) for n in names]


def splits(features_dir: str) -> list[str]:
    """Splits with at least one complete shard."""
    return sorted(
        s
        for s in os.listdir(features_dir)
        if os.path.isdir(os.path.join(features_dir, s)) and shard_indexes(features_dir, s)
    )


def done_ids(features_dir: str, split: str) -> set[str]:
    """Video ids already handled in `split` (written or failed), by any host."""
    done: set[str] = set()
    for index in shard_indexes(features_dir, split):
        done.update(index["videos"])
        done.update(f["video_id"] for f in index["failed"])
    return done


class ShardWriter:
    """Writes the shards of one host for one split; every `shard_size` videos make a shard.

    `add` and `fail` count towards the shard; `close` finishes the last (partial) shard.
    Only a finished shard counts as done (see the module docstring).
    """

    def __init__(self, features_dir: str, split: str, process_index: int, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.split_dir = os.path.join(features_dir, split)
        self.split = split
        self.prefix = f"h{process_index:03d}-"
        self.shard_size = shard_size
        os.makedirs(self.split_dir, exist_ok=True)
        self._clean_unfinished()
        taken = [
            int(m.group(2))
            for n in os.listdir(self.split_dir)
            if (m := _SHARD_RE.match(n)) and n.startswith(self.prefix)
        ]
        self._next = max(taken, default=-1) + 1
        self._writer = None
        self._reset()

    def _clean_unfinished(self) -> None:
        """Deletes this host's leftovers of an interrupted run (no index = not done)."""
        for path in glob.glob(os.path.join(self.split_dir, self.prefix + "*")):
            name = os.path.basename(path)
            stem = name.split(".", 1)[0]
            finished = os.path.exists(os.path.join(self.split_dir, stem + ".json"))
            if ".tmp" in name or not finished:
                os.remove(path)

    def _reset(self) -> None:
        self._videos: list[str] = []
        self._failed: list[dict[str, str]] = []
        self._notes: list[dict[str, str]] = []
        self._extra: dict[str, Any] = {}

    def _open(self):
        from array_record.python import array_record_module

        self._name = f"{self.prefix}{self._next:05d}"
        self._next += 1
        self._tmp = os.path.join(self.split_dir, self._name + ".array_record.tmp")
        self._writer = array_record_module.ArrayRecordWriter(self._tmp, _WRITER_OPTIONS)

    @property
    def _count(self) -> int:
        return len(self._videos) + len(self._failed)

    def add(self, record: dict[str, Any], notes: Sequence[str] = ()) -> None:
        if self._writer is None:
            self._open()
        self._writer.write(encode_record(record))
        self._videos.append(record["video_id"])
        self._notes.extend({"video_id": record["video_id"], "note": n} for n in notes)
        if self._count >= self.shard_size:
            self._finish()

    def fail(self, video_id: str, reason: str, message: str) -> None:
        if self._writer is None:
            self._open()
        self._failed.append({"video_id": video_id, "reason": reason, "message": message})
        if self._count >= self.shard_size:
            self._finish()

    def _finish(self) -> None:
        self._writer.close()
        self._writer = None
        os.replace(self._tmp, os.path.join(self.split_dir, self._name + ".array_record"))
        index = dict(
            shard=self._name + ".array_record",
            split=self.split,
            num_records=len(self._videos),
            videos=self._videos,
            failed=self._failed,
            notes=self._notes,
        )
        write_json(os.path.join(self.split_dir, self._name + ".json"), index)
        self._reset()

    def close(self) -> None:
        if self._writer is not None:
            self._finish()


@dataclasses.dataclass
class _Rows:
    files: list[str]
    keys: list[str]
    rows: np.ndarray  # int64[N]: row of each unique key in the concatenation of `files`


class FeatureTable(Sequence):
    """Random access to the features of one split: `table[i]` is a dict with `video_id` (str)
    and the encoder's arrays; `keys` lists the video ids in record order.

    A video written twice (only possible after changing the host count mid-extraction and
    deleting indexes by hand) is read from its first shard.
    """

    def __init__(self, features_dir: str, split: str):
        self.features_dir = features_dir
        self.split = split
        self.metadata = read_metadata(features_dir)
        indexes = shard_indexes(features_dir, split)
        if not indexes:
            raise FileNotFoundError(f"no complete shards of split {split!r} in {features_dir}")
        files, keys, rows, seen, offset = [], [], [], set(), 0
        for index in indexes:
            files.append(os.path.join(features_dir, split, index["shard"]))
            for i, vid in enumerate(index["videos"]):
                if vid not in seen:
                    seen.add(vid)
                    keys.append(vid)
                    rows.append(offset + i)
            offset += index["num_records"]
        self._rows = _Rows(files, keys, np.asarray(rows, np.int64))
        self._source = None

    @property
    def keys(self) -> list[str]:
        return self._rows.keys

    @property
    def fields(self) -> dict[str, Any]:
        """Field name -> {"shape", "dtype", "doc"} as recorded in metadata.json."""
        return self.metadata["fields"]

    def _data(self):
        if self._source is None:
            from array_record.python import array_record_data_source

            self._source = array_record_data_source.ArrayRecordDataSource(self._rows.files)
        return self._source

    def __getstate__(self):  # grain workers get a copy that opens its own readers
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __len__(self) -> int:
        return len(self._rows.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        return decode_record(self._data()[int(self._rows.rows[index])])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        rows = [int(self._rows.rows[i]) for i in indices]
        return [decode_record(r) for r in self._data().__getitems__(rows)]

    def side_table(self, name: str = "features", join_on: str = "video_id"):
        """This table as an `input_pipeline.SideTable` (keys known: no record is read to index)."""
        from tiktalk_jax import input_pipeline

        return input_pipeline.SideTable(
            name=name, source=self, key="video_id", join_on=join_on, keys=self.keys
        )
