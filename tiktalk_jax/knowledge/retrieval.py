"""Dialogue -> knowledge text: nearest knowledge-graph heads by cosine similarity, their tails.

    kg = c3kg.read_tsv("knowledge.tsv")
    enc = sentence_encoder.SentenceEncoder.from_pretrained(DIR)   # or LexicalEncoder.fit(kg.heads)
    retriever = KnowledgeRetriever(kg, enc, RetrievalConfig(k=3), cache_dir="/tmp/kg_cache")
    retriever.retrieve(dialogue_records)   # [{"dialogue_id", "knowledge", "heads", "scores"}]

As in TikTalk's Maria+C3KG (paper section 4.2, figure 3b): every head is embedded once; a
dialogue's query is embedded with the same encoder (the paper: Sentence-BERT over the context);
the k most similar heads whose similarity exceeds `threshold` give their tails in the selected
relation families, joined with ";" (the figure: head "PersonX learns fast" -> "diligent;
talented; PersonX studies hard;"). The paper does not say how many heads it used; the figure
shows one, hence the default k=1. Tails are ordered by head rank, then by family in
the order of `families` (c3kg.ALL_FAMILIES by default), then file order; a tail already used by a
better head is not repeated. Heads without a tail in the selected families are left out of the
index.

The query. A dialogue's context (its last `max_context_turns` turns, all by default, joined by
spaces) together with the video title, which is often the only text that says what a video shows.
`title_mode`:
  "vector" (default)  q = unit(enc(context)) + title_weight * unit(enc(title)): the title shifts
                      the query without drowning a short comment (a concatenated text is
                      dominated by whichever part is longer).
  "text"              enc(context + " " + title), one text as the paper's "context with the title".
  "none"              the context alone.
Contexts and titles are deduplicated before encoding (train replies share contexts, a video's
dialogues share a title).

Head embeddings are cached on disk (`cache_dir`), keyed by the KG file's sha256, the reader's
version and the encoder's identity (its files' hash and options): a changed KG or encoder is
re-encoded, an unchanged one is memory-mapped from the cache.

Search (`HeadIndex`): heads are unit-normalised, padded and sharded over every device of the mesh;
each device scans its shard in blocks of `block` heads (one [Q, D] x [D, block] matmul + lax.top_k
per block, merged into a running top-k), and the per-device top-k lists are merged by a final
top_k. lax.top_k puts the lower index first among equal scores, and candidates are always merged
in increasing head order, so ties go to the lower head index. The block size depends only on the
number of heads and `head_block` (never on the device count) so every score comes from the same
matmul shape: the result is identical on 1 or N devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tiktalk_jax.knowledge import c3kg
from tiktalk_jax.knowledge.sentence_encoder import Encoder

Record = Mapping[str, Any]
TITLE_MODES = ("vector", "text", "none")
# Bumped when the cached file's meaning changes (reader or embedding layout).
_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """Retrieval options (see the module docstring).

    Attributes:
      k: heads retrieved per dialogue (the paper's figure shows the tails of one head).
      families: relation families whose tails form the knowledge (None: c3kg.ALL_FAMILIES).
      threshold: a head is used only if its cosine similarity is > threshold (0.0 drops heads
        sharing nothing with a lexical query; -1.0 keeps all k).
      title_mode: "vector" | "text" | "none".
      title_weight: weight of the title vector in "vector" mode.
      max_context_turns: latest context turns in the query (0: all).
      max_tails_per_head: tails taken from one head (0: all).
      separator: joins the tails.
      batch_size: encoder batch size.
      query_chunk: queries per search call (a static shape: one compile).
      head_block: heads per matmul block in the search (upper bound).
      dialogue_chunk: dialogues encoded and searched together by `retrieve`.
    """

    k: int = 1
    families: tuple[str, ...] | None = None
    threshold: float = 0.0
    title_mode: str = "vector"
    title_weight: float = 0.5
    max_context_turns: int = 0
    max_tails_per_head: int = 0
    separator: str = ";"
    batch_size: int = 64
    query_chunk: int = 256
    head_block: int = 4096
    dialogue_chunk: int = 8192

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.title_mode not in TITLE_MODES:
            raise ValueError(f"title_mode must be one of {TITLE_MODES}, got {self.title_mode!r}")
        if self.families is not None:
            object.__setattr__(self, "families", c3kg.check_families(self.families))


def as_text(value: Any) -> str:
    """TFDS sources give Text features as bytes; in-memory records use str."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


# ---------------------------------------------------------------------------------------------
# Head embeddings, cached.
# ---------------------------------------------------------------------------------------------


def cache_key(kg: c3kg.KnowledgeGraph, encoder: Encoder) -> str:
    text = json.dumps([_CACHE_VERSION, kg.sha256, len(kg.heads), encoder.identity])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def head_embeddings(
    kg: c3kg.KnowledgeGraph,
    encoder: Encoder,
    *,
    cache_dir: str | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """`float32[len(kg.heads), D]` embeddings of every head, from the cache when present.

    The cache is `<cache_dir>/heads-<key>.npy` (+ `.json` describing it), written atomically.
    """
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"heads-{cache_key(kg, encoder)}.npy")
        if os.path.isfile(path):
            emb = np.load(path, mmap_mode="r")
            if emb.shape == (len(kg.heads), encoder.dim):
                logging.info("Head embeddings from cache %s", path)
                return emb
            logging.warning("Cache %s has shape %s; re-encoding", path, emb.shape)
    emb = encoder.encode(kg.heads, batch_size=batch_size, progress=progress)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".heads-", suffix=".npy")
        with os.fdopen(fd, "wb") as f:
            np.save(f, emb)
        os.replace(tmp, path)
        meta = dict(
            kg=kg.source,
            kg_sha256=kg.sha256,
            heads=len(kg.heads),
            encoder=encoder.identity,
            dim=encoder.dim,
            version=_CACHE_VERSION,
        )
        with open(path[: -len(".npy")] + ".json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    return emb


# ---------------------------------------------------------------------------------------------
# Sharded top-k search.
# ---------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def default_mesh() -> jax.sharding.Mesh:
    """All local devices on one axis."""
    return jax.sharding.Mesh(np.asarray(jax.local_devices()), ("heads",))


class HeadIndex:
    """Unit-normalised head embeddings sharded over a mesh; exact top-k cosine search.

    Args:
      embeddings: `float[N, D]`.
      mesh: heads are sharded over all its axes (flattened); default: every local device.
      head_block: upper bound of the per-matmul block of heads.
      query_chunk: queries per compiled call (shorter inputs are padded).
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        *,
        mesh: jax.sharding.Mesh | None = None,
        head_block: int = 4096,
        query_chunk: int = 256,
    ):
        self.mesh = mesh if mesh is not None else default_mesh()
        self.axes = tuple(self.mesh.axis_names)
        self.num_heads, self.dim = int(embeddings.shape[0]), int(embeddings.shape[1])
        self.query_chunk = int(query_chunk)
        n_dev = self.mesh.size
        # A function of N only (never of the device count), so scores are bitwise the same on any
        # mesh; N/8 keeps padding small on up to 8 devices.
        self.block = int(min(head_block, max(8, _next_pow2(math.ceil(self.num_heads / 8)))))
        per_device = math.ceil(max(self.num_heads, 1) / (n_dev * self.block)) * self.block
        padded = np.zeros((n_dev * per_device, self.dim), np.float32)
        padded[: self.num_heads] = _unit(embeddings)
        self.heads = jax.device_put(padded, NamedSharding(self.mesh, P(self.axes, None)))
        self._fns: dict[int, Any] = {}

    def _search_fn(self, k: int):
        if k in self._fns:
            return self._fns[k]
        axes, block, n_valid = self.axes, self.block, self.num_heads
        hp = jax.lax.Precision.HIGHEST

        def local(heads: jax.Array, q: jax.Array):
            rows, dim = heads.shape
            base = jax.lax.axis_index(axes) * rows
            blocks = heads.reshape(rows // block, block, dim)
            kk = min(k, block)

            def step(carry, xs):
                best_v, best_i = carry
                blk, b = xs
                s = jnp.dot(q, blk.T, precision=hp)  # [Q, block]
                gi = (base + b * block + jnp.arange(block)).astype(jnp.int32)
                s = jnp.where(gi[None, :] < n_valid, s, -jnp.inf)
                v, j = jax.lax.top_k(s, kk)
                # Earlier blocks (lower head indices) first: top_k keeps the lower position on ties.
                cand_v = jnp.concatenate([best_v, v], axis=1)
                cand_i = jnp.concatenate([best_i, gi[j]], axis=1)
                v2, j2 = jax.lax.top_k(cand_v, k)
                return (v2, jnp.take_along_axis(cand_i, j2, axis=1)), None

            nq = q.shape[0]
            init = (jnp.full((nq, k), -jnp.inf, jnp.float32), jnp.full((nq, k), -1, jnp.int32))
            (v, i), _ = jax.lax.scan(step, init, (blocks, jnp.arange(rows // block)))
            return v, i

        sharded = jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(P(axes, None), P()),
            out_specs=(P(None, axes), P(None, axes)),
            check_vma=False,
        )

        @jax.jit
        def search(heads, q):
            v, i = sharded(heads, q)  # [Q, devices * k], device-major = increasing head order
            v, j = jax.lax.top_k(v, k)
            i = jnp.take_along_axis(i, j, axis=1)
            return v, jnp.where(jnp.isfinite(v), i, -1)

        self._fns[k] = search
        return search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k cosine similarities of `queries: float[Q, D]` (normalised here).

        Returns `(scores float32[Q, k], indices int32[Q, k])`, best first; index -1 (score -inf)
        where the index has fewer than k heads.
        """
        queries = _unit(queries)
        nq = queries.shape[0]
        scores = np.full((nq, k), -np.inf, np.float32)
        indices = np.full((nq, k), -1, np.int32)
        if self.num_heads == 0 or nq == 0:
            return scores, indices
        fn = self._search_fn(k)
        replicated = NamedSharding(self.mesh, P())
        c = self.query_chunk
        for start in range(0, nq, c):
            part = queries[start : start + c]
            q = np.zeros((c, self.dim), np.float32)
            q[: len(part)] = part
            v, i = fn(self.heads, jax.device_put(q, replicated))
            scores[start : start + len(part)] = np.asarray(v)[: len(part)]
            indices[start : start + len(part)] = np.asarray(i)[: len(part)]
        return scores, indices


# ---------------------------------------------------------------------------------------------
# The retriever.
# ---------------------------------------------------------------------------------------------


class KnowledgeRetriever:
    """Knowledge text per dialogue (see the module docstring)."""

    def __init__(
        self,
        kg: c3kg.KnowledgeGraph,
        encoder: Encoder,
        config: RetrievalConfig = RetrievalConfig(),
        *,
        cache_dir: str | None = None,
        mesh: jax.sharding.Mesh | None = None,
        progress: bool = False,
    ):
        self.kg, self.encoder, self.config = kg, encoder, config
        self.families = c3kg.check_families(config.families)
        emb = head_embeddings(
            kg, encoder, cache_dir=cache_dir, batch_size=config.batch_size, progress=progress
        )
        # Index rows -> kg head ids: only heads that have knowledge in the chosen families.
        self.head_ids = np.flatnonzero(np.asarray(kg.has_families(self.families), bool))
        self.index = HeadIndex(
            np.asarray(emb)[self.head_ids] if len(self.head_ids) else np.zeros((0, encoder.dim)),
            mesh=mesh,
            head_block=config.head_block,
            query_chunk=config.query_chunk,
        )
        if len(self.head_ids) == 0:
            logging.warning("No head of %s has tails in families %s", kg.source, self.families)

    def context_text(self, record: Record) -> str:
        turns = [as_text(t).strip() for t in record.get("context", ())]
        if self.config.max_context_turns > 0:
            turns = turns[-self.config.max_context_turns :]
        return " ".join(t for t in turns if t)

    def _encode_unique(self, texts: list[str]) -> np.ndarray:
        """Unit vectors of `texts`, each distinct text encoded once."""
        unique = list(dict.fromkeys(texts))
        emb = _unit(self.encoder.encode(unique, batch_size=self.config.batch_size))
        row = {t: i for i, t in enumerate(unique)}
        return emb[[row[t] for t in texts]]

    def query_vectors(self, records: Sequence[Record]) -> np.ndarray:
        """`float32[len(records), D]` query embeddings (see "The query" above)."""
        cfg = self.config
        contexts = [self.context_text(r) for r in records]
        titles = [as_text(r.get("title", "")).strip() for r in records]
        if cfg.title_mode == "text":
            return self._encode_unique([f"{c} {t}".strip() for c, t in zip(contexts, titles)])
        q = self._encode_unique(contexts)
        if cfg.title_mode == "vector" and cfg.title_weight != 0:
            has_title = np.array([bool(t) for t in titles])[:, None]
            q = q + cfg.title_weight * has_title * self._encode_unique(titles)
        return q

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k `(scores float32[Q, k], kg head ids int64[Q, k])`, -1 where none."""
        scores, rows = self.index.search(queries, self.config.k)
        heads = np.where(rows >= 0, self.head_ids[np.maximum(rows, 0)], -1)
        return scores, heads

    def knowledge(self, heads: Sequence[int], scores: Sequence[float]) -> dict[str, Any]:
        """The kept heads (score > threshold), their scores and the joined tails."""
        cfg = self.config
        kept_heads, kept_scores, tails = [], [], {}
        max_tails = cfg.max_tails_per_head or None
        for h, s in zip(heads, scores):
            if h < 0 or not s > cfg.threshold:
                continue
            kept_heads.append(self.kg.heads[h])
            kept_scores.append(float(s))
            for t in self.kg.tails_of(int(h), self.families, max_tails):
                tails.setdefault(t, None)
        return dict(knowledge=cfg.separator.join(tails), heads=kept_heads, scores=kept_scores)

    def iter_retrieve(
        self, records: Sequence[Record], progress: bool = False, desc: str = "retrieve"
    ) -> Iterator[dict[str, Any]]:
        """Yields `{"dialogue_id", "knowledge", "heads", "scores"}` per record, in order."""
        from tqdm import tqdm

        n = len(records)
        chunk = self.config.dialogue_chunk
        with tqdm(total=n, desc=desc, unit="dialogue", disable=not progress) as bar:
            for start in range(0, n, chunk):
                rows = list(range(start, min(n, start + chunk)))
                getitems = getattr(records, "__getitems__", None)
                part = list(getitems(rows)) if getitems else [records[i] for i in rows]
                scores, heads = self.search(self.query_vectors(part))
                for r, h, s in zip(part, heads, scores):
                    out = {"dialogue_id": as_text(r.get("dialogue_id", ""))}
                    out.update(self.knowledge(h.tolist(), s.tolist()))
                    yield out
                bar.update(len(part))

    def retrieve(self, records: Sequence[Record], progress: bool = False) -> list[dict[str, Any]]:
        return list(self.iter_retrieve(records, progress=progress))
