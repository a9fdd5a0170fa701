"""Sentence embeddings for knowledge retrieval: a Flax port of sentence-transformers' BERT
pipeline, and a deterministic lexical fallback.

    enc = SentenceEncoder.from_pretrained("/path/to/sbert-chinese")   # a local ST directory
    emb = enc.encode(["我室友每天都去跑步", ...], batch_size=256)        # float32[N, D]

`SentenceEncoder` reads a sentence-transformers directory exactly as sentence-transformers does:
`modules.json` lists the modules in order; supported are `models.Transformer` (a BERT checkpoint,
in the directory root or a subfolder, with its tokenizer and `sentence_bert_config.json`:
`max_seq_length`, `do_lower_case`), `models.Pooling` (`<dir>/config.json`: cls / max / mean /
mean_sqrt_len_tokens / weightedmean / lasttoken, concatenated in sentence-transformers' order),
`models.Dense` (linear + activation) and `models.Normalize` (L2). A plain HF BERT directory
without `modules.json` gets mean pooling, as sentence-transformers does. Texts are stripped (and
lower-cased when `do_lower_case`) and tokenized by the directory's own tokenizer with
truncation at `max_seq_length`, so `encode` returns what `SentenceTransformer.encode` returns
(float32; tested against PyTorch to 1e-4).

Speed: texts are tokenized per chunk, sorted by length, and run in batches whose length is padded
to a power of two (at least `min_bucket`, at most `max_seq_length`): a jitted forward compiles
once per bucket (`num_compiles` counts them), padding costs at most 2x, and the next batch is
dispatched before the previous one is copied back. With a `mesh`, batches are sharded over all of
its devices (data parallel, parameters replicated).

`LexicalEncoder` (`--encoder=lexical`) is NOT a neural encoder: character n-gram (1-2) TF-IDF
vectors over the knowledge heads' vocabulary (sublinear tf, smoothed idf, L2-normalised; hashed
into `max_dim` coordinates only when the vocabulary is larger). Use it when no
pretrained sentence encoder is at hand (the bundled sample, tests): a random-init BERT gives
vectors without meaning, while shared characters ("每天都去跑步" ~ "PersonX 每天跑步") are
enough to find the head a comment paraphrases closely. It knows no synonyms.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import re
import unicodedata
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tiktalk_jax.models import bert, hf_import

# sentence-transformers concatenates pooled vectors in this order.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
# Dense activations by the torch class name sentence-transformers stores.
_DENSE_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "identity": lambda x: x,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "sigmoid": jax.nn.sigmoid,
}


class Encoder(Protocol):
    """What retrieval needs from an encoder."""

    @property
    def identity(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(
        self, texts: Sequence[str], batch_size: int = ..., progress: bool = ...
    ) -> np.ndarray: ...


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="text", disable=not enabled, smoothing=0.1)


# ---------------------------------------------------------------------------------------------
# Pooling and the head modules (Dense, Normalize).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pooling:
    """sentence-transformers' Pooling: `modes` in POOLING_MODES order."""

    modes: tuple[str, ...] = ("mean",)

    def __post_init__(self):
        bad = [m for m in self.modes if m not in POOLING_MODES]
        if bad or not self.modes:
            raise ValueError(f"pooling modes {self.modes} invalid; choose from {POOLING_MODES}")
        object.__setattr__(self, "modes", tuple(m for m in POOLING_MODES if m in self.modes))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Pooling:
        """From `1_Pooling/config.json` (the `pooling_mode` string or the boolean flags)."""
        if config.get("pooling_mode"):
            return cls((str(config["pooling_mode"]).lower(),))
        modes = tuple(m for m, key in _POOLING_KEYS.items() if config.get(key, m == "mean"))
        return cls(modes)

    def __call__(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
        """`hidden: float[B, T, H]`, `mask: bool[B, T]` -> `float[B, len(modes) * H]`."""
        m = mask[..., None].astype(hidden.dtype)
        out = []
        for mode in self.modes:
            if mode == "cls":
                out.append(hidden[:, 0])
            elif mode == "max":
                # Padding gets -1e9, not -inf: an all-padding row stays finite, as in torch.
                out.append(jnp.max(jnp.where(m > 0, hidden, -1e9), axis=1))
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                total = jnp.sum(hidden * m, axis=1)
                count = jnp.maximum(jnp.sum(m, axis=1), 1e-9)
                out.append(total / (count if mode == "mean" else jnp.sqrt(count)))
            elif mode == "weightedmean":
                w = m * jnp.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype)[None, :, None]
                out.append(jnp.sum(hidden * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1e-9))
            else:  # lasttoken: the last position the mask keeps
                t = hidden.shape[1]
                last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
                last = jnp.where(jnp.any(mask, axis=1), last, t - 1)
                picked = jnp.take_along_axis(hidden * m, last[:, None, None], axis=1)
                out.append(picked[:, 0])
        return jnp.concatenate(out, axis=-1)


@dataclasses.dataclass
class Dense:
    """sentence-transformers' Dense module: `activation(x @ kernel + bias)`."""

    kernel: np.ndarray  # float[in, out]
    bias: np.ndarray | None  # float[out]
    activation: str = "tanh"

    @classmethod
    def load(cls, directory: str) -> tuple[Dense, list[str]]:
        """Reads `<dir>/config.json` and the weights; returns the module and the files read."""
        config_file = os.path.join(directory, "config.json")
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        weights = None
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(directory, name)):
                weights = os.path.join(directory, name)
                break
        if weights is None:
            raise FileNotFoundError(f"Dense module {directory!r} has no weights file")
        sd = hf_import.read_weights_file(weights)
        act = config.get("activation_function", "torch.nn.modules.activation.Tanh")
        act = act.rsplit(".", 1)[-1].lower()
        if act not in _DENSE_ACTIVATIONS:
            raise ValueError(f"Dense activation {act!r}: supported {sorted(_DENSE_ACTIVATIONS)}")
        kernel = np.asarray(sd["linear.weight"], np.float32).T
        bias = np.asarray(sd["linear.bias"], np.float32) if "linear.bias" in sd else None
        return cls(kernel, bias, act), [config_file, weights]


# ---------------------------------------------------------------------------------------------
# The sentence-transformers encoder.
# ---------------------------------------------------------------------------------------------


def _module_kind(entry: dict[str, Any]) -> str:
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def _hash_files(files: Sequence[str], extra: str) -> str:
    h = hashlib.sha256(extra.encode("utf-8"))
    for file in files:
        h.update(os.path.basename(file).encode("utf-8"))
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


class SentenceEncoder:
    """BERT + pooling (+ Dense) (+ Normalize), batched and jitted. See the module docstring."""

    def __init__(
        self,
        model: bert.BertModel,
        tokenizer: Any,
        *,
        pooling: Pooling = Pooling(),
        dense: Sequence[Dense] = (),
        normalize: bool = False,
        max_seq_length: int = 128,
        do_lower_case: bool = False,
        identity: str = "",
        mesh: jax.sharding.Mesh | None = None,
        min_bucket: int = 8,
    ):
        model.eval()
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.dense = list(dense)
        self.normalize = normalize
        self.max_seq_length = int(max_seq_length)
        self.do_lower_case = do_lower_case
        self.min_bucket = int(min_bucket)
        self.mesh = mesh
        self.num_compiles = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        dim = len(pooling.modes) * model.config.hidden_size
        if self.dense:
            dim = self.dense[-1].kernel.shape[1]
        self._dim = dim
        self._identity = identity or f"unnamed-{id(self)}"
        graphdef, state = nnx.split(model)
        params = (state, [(d.kernel, d.bias) for d in self.dense])
        if mesh is not None:
            params = jax.device_put(
                params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            )
        else:
            params = jax.device_put(params)
        self._params = params
        activations = [_DENSE_ACTIVATIONS[d.activation] for d in self.dense]

        def forward(params, ids, mask):
            self.num_compiles += 1  # runs once per trace, i.e. per compiled shape
            state, dense_params = params
            net = nnx.merge(graphdef, state)
            hidden = net(ids, None, mask)
            emb = self.pooling(hidden, mask)
            for (kernel, bias), act in zip(dense_params, activations):
                emb = jnp.dot(emb, kernel, precision=jax.lax.Precision.HIGHEST)
                emb = act(emb if bias is None else emb + bias)
            if self.normalize:
                norm = jnp.linalg.norm(emb, axis=-1, keepdims=True)
                emb = emb / jnp.maximum(norm, 1e-12)
            return emb.astype(jnp.float32)

        self._forward = jax.jit(forward)

    @property
    def identity(self) -> str:
        """A hash of everything that determines the vectors (files read, dtype, options)."""
        return self._identity

    @property
    def dim(self) -> int:
        return self._dim

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype=jnp.float32,
        mesh: jax.sharding.Mesh | None = None,
        min_bucket: int = 8,
    ) -> SentenceEncoder:
        """Loads a local sentence-transformers directory (or a plain HF BERT directory)."""
        import transformers

        if not os.path.isdir(path):
            raise FileNotFoundError(f"no sentence-transformers directory {path!r}")
        modules_file = os.path.join(path, "modules.json")
        if os.path.isfile(modules_file):
            with open(modules_file, encoding="utf-8") as f:
                modules = json.load(f)
            files = [modules_file]
        else:  # sentence-transformers wraps a plain HF model in Transformer + mean Pooling
            modules = [
                {"path": "", "type": "sentence_transformers.models.Transformer"},
                {"path": "", "type": "sentence_transformers.models.Pooling", "mean": True},
            ]
            files = []
        transformer_dir, pooling, dense, normalize = None, None, [], False
        for entry in sorted(modules, key=lambda e: e.get("idx", 0)):
            kind, sub = _module_kind(entry), os.path.join(path, entry.get("path", ""))
            if kind == "Transformer":
                if transformer_dir is not None:
                    raise ValueError(f"{modules_file}: more than one Transformer module")
                transformer_dir = sub
            elif kind == "Pooling":
                if entry.get("mean"):
                    pooling = Pooling(("mean",))
                else:
                    config_file = os.path.join(sub, "config.json")
                    with open(config_file, encoding="utf-8") as f:
                        pooling = Pooling.from_config(json.load(f))
                    files.append(config_file)
            elif kind == "Dense":
                module, read = Dense.load(sub)
                dense.append(module)
                files.extend(read)
            elif kind == "Normalize":
                normalize = True
            else:
                raise ValueError(
                    f"{modules_file}: module type {entry.get('type')!r} is not supported "
                    "(Transformer, Pooling, Dense and Normalize are)"
                )
        if transformer_dir is None or pooling is None:
            raise ValueError(f"{path}: modules.json needs a Transformer and a Pooling module")

        hf_config = hf_import.load_config(transformer_dir)
        if hf_config.get("model_type", "bert") != "bert":
            raise ValueError(
                f"{transformer_dir}: model_type {hf_config.get('model_type')!r}; only BERT "
                "sentence encoders are ported (e.g. Chinese SBERT / text2vec BERT models)"
            )
        st_config = {}
        for name in ("sentence_bert_config.json",):
            file = os.path.join(transformer_dir, name)
            if os.path.isfile(file):
                with open(file, encoding="utf-8") as f:
                    st_config = json.load(f)
                files.append(file)
        # The directory's own tokenizer (from_pretrained reads vocab.txt / tokenizer.json; never
        # BertTokenizerFast(vocab_file=...), which transformers 5 silently ignores).
        tokenizer = transformers.AutoTokenizer.from_pretrained(transformer_dir)
        model = bert.from_pretrained(transformer_dir, dtype=dtype)
        max_len = st_config.get("max_seq_length")
        if max_len is None:
            max_len = min(
                model.config.max_position_embeddings,
                int(getattr(tokenizer, "model_max_length", 10**9) or 10**9),
            )
        for name in (
            "config.json",
            "vocab.txt",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
        ):
            file = os.path.join(transformer_dir, name)
            if os.path.isfile(file):
                files.append(file)
        options = json.dumps(
            dict(dtype=str(jnp.dtype(dtype)), max_seq_length=max_len, v=1), sort_keys=True
        )
        return cls(
            model,
            tokenizer,
            pooling=pooling,
            dense=dense,
            normalize=normalize,
            max_seq_length=max_len,
            do_lower_case=bool(st_config.get("do_lower_case", False)),
            identity="st-" + _hash_files(files, options),
            mesh=mesh,
            min_bucket=min_bucket,
        )

    @classmethod
    def random_init(
        cls,
        vocab: Sequence[str],
        config: bert.BertConfig,
        *,
        pooling: str = "mean",
        normalize: bool = True,
        max_seq_length: int = 64,
        seed: int = 0,
        mesh: jax.sharding.Mesh | None = None,
    ) -> SentenceEncoder:
        """A random-init BERT encoder over a WordPiece `vocab`: meaningless vectors, for speed
        measurements and plumbing tests only (`--encoder=random`)."""
        import transformers

        tokenizer = transformers.BertTokenizerFast(
            vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True
        )
        config = dataclasses.replace(config, vocab_size=len(vocab))
        model = bert.BertModel(config, add_pooling_layer=False, rngs=nnx.Rngs(seed))
        identity = hashlib.sha256(
            json.dumps(
                [dataclasses.asdict(config), list(vocab), pooling, normalize, max_seq_length, seed]
            ).encode("utf-8")
        ).hexdigest()
        return cls(
            model,
            tokenizer,
            pooling=Pooling((pooling,)),
            normalize=normalize,
            max_seq_length=max_seq_length,
            identity="random-" + identity,
            mesh=mesh,
        )

    def _prepare(self, text: str) -> str:
        text = str(text).strip()
        return text.lower() if self.do_lower_case else text

    def _bucket(self, length: int) -> int:
        return min(self.max_seq_length, max(self.min_bucket, _next_pow2(length)))

    def _batch_rows(self, n: int, batch_size: int) -> int:
        rows = batch_size if n >= batch_size else min(batch_size, _next_pow2(n))
        if self.mesh is not None:
            rows = -(-rows // self.mesh.size) * self.mesh.size
        return rows

    def _device_batch(self, ids: np.ndarray, mask: np.ndarray):
        if self.mesh is None:
            return ids, mask
        spec = jax.sharding.PartitionSpec(tuple(self.mesh.axis_names))
        sharding = jax.sharding.NamedSharding(self.mesh, spec)
        return jax.device_put(ids, sharding), jax.device_put(mask, sharding)

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Embeds `texts` -> `float32[N, dim]` in input order."""
        n = len(texts)
        out = np.zeros((n, self.dim), np.float32)
        if n == 0:
            return out
        rows = self._batch_rows(n, batch_size)
        chunk = max(rows * 64, 4096)  # tokenized at once, then sorted by length
        pending: list[tuple[np.ndarray, jax.Array]] = []
        with _progress(n, "encode", progress) as bar:
            for start in range(0, n, chunk):
                part = [self._prepare(t) for t in texts[start : start + chunk]]
                ids = self.tokenizer(
                    part,
                    truncation=True,
                    max_length=self.max_seq_length,
                    padding=False,
                    return_attention_mask=False,
                    return_token_type_ids=False,
                )["input_ids"]
                lengths = np.array([len(x) for x in ids])
                order = np.argsort(-lengths, kind="stable")
                for b in range(0, len(order), rows):
                    idx = order[b : b + rows]
                    t = self._bucket(int(lengths[idx[0]]))
                    batch = np.full((rows, t), self.pad_id, np.int32)
                    for r, i in enumerate(idx):
                        batch[r, : lengths[i]] = ids[i]
                    mask = (
                        np.arange(t)[None, :]
                        < np.concatenate([lengths[idx], np.zeros(rows - len(idx), lengths.dtype)])[
                            :, None
                        ]
                    )
                    emb = self._forward(self._params, *self._device_batch(batch, mask))
                    # Keep one batch in flight: tokenizing/padding the next overlaps the device.
                    pending.append((start + idx, emb))
                    if len(pending) > 1:
                        where, done = pending.pop(0)
                        out[where] = np.asarray(done)[: len(where)]
                        bar.update(len(where))
            for where, done in pending:
                out[where] = np.asarray(done)[: len(where)]
                bar.update(len(where))
        return out


# ---------------------------------------------------------------------------------------------
# The lexical fallback.
# ---------------------------------------------------------------------------------------------

# ATOMIC/C3KG placeholders say nothing about the event; comments never contain them.
_PLACEHOLDERS = re.compile(r"person\s*[xyz]|___+|某人", re.IGNORECASE)
_WORD_RUNS = re.compile(r"\w+")


class LexicalEncoder:
    """TF-IDF over character n-grams of the knowledge heads (see the module docstring).

    Build with `fit(heads)`. The vocabulary is the heads' n-grams; each gets a coordinate of its
    own when they fit in `max_dim - 1` (exact TF-IDF), else a crc32 hash bucket. Coordinate 0 is
    reserved: it holds the weight of a text's n-grams that no head has (heads are 0 there), so
    such n-grams cannot collide with head n-grams yet still count in the cosine's norm, as in
    unhashed TF-IDF. Weights: (1 + ln tf) * idf, idf = ln((1 + N) / (1 + df)) + 1 (smoothed, N
    heads), rows L2-normalised.
    """

    VERSION = 2

    def __init__(
        self,
        buckets: dict[str, int],
        idf: dict[str, float],
        dim: int,
        num_docs: int,
        ngrams: tuple[int, int] = (1, 2),
    ):
        self.ngrams = (int(ngrams[0]), int(ngrams[1]))
        if not 1 <= self.ngrams[0] <= self.ngrams[1]:
            raise ValueError(f"ngrams must be (lo, hi) with 1 <= lo <= hi, got {ngrams}")
        self.buckets, self.idf, self._dim = buckets, idf, int(dim)
        self.oov_idf = math.log(1.0 + num_docs) + 1.0  # df = 0
        h = hashlib.sha256(json.dumps([self.VERSION, dim, num_docs, self.ngrams]).encode())
        for gram in sorted(buckets):
            h.update(f"{gram}\t{buckets[gram]}\t{idf[gram]!r}\n".encode())
        self._identity = f"lexical-v{self.VERSION}-d{dim}-{h.hexdigest()[:24]}"

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def dim(self) -> int:
        return self._dim

    @staticmethod
    def grams(text: str, ngrams: tuple[int, int] = (1, 2)) -> list[str]:
        """The character n-grams of `text`: NFKC, lower case, placeholders removed, n-grams taken
        within runs of word characters (CJK, letters, digits), never across punctuation."""
        text = _PLACEHOLDERS.sub(" ", unicodedata.normalize("NFKC", str(text)).lower())
        out = []
        for run in _WORD_RUNS.findall(text):
            for n in range(ngrams[0], ngrams[1] + 1):
                out.extend(run[i : i + n] for i in range(len(run) - n + 1))
        return out

    @classmethod
    def fit(
        cls, corpus: Sequence[str], max_dim: int = 2048, ngrams: tuple[int, int] = (1, 2)
    ) -> LexicalEncoder:
        """Vocabulary and idf from `corpus` (the heads); dim = min(max_dim, vocabulary + 1)."""
        df: collections.Counter = collections.Counter()
        for text in corpus:
            df.update(set(cls.grams(text, ngrams)))
        n = len(corpus)
        idf = {g: math.log((1.0 + n) / (1.0 + c)) + 1.0 for g, c in df.items()}
        vocab = sorted(df)
        if len(vocab) + 1 <= max_dim:
            dim = len(vocab) + 1
            buckets = {g: i + 1 for i, g in enumerate(vocab)}
        else:  # crc32: stable across processes (Python's str hash is salted per process)
            dim = int(max_dim)
            buckets = {g: 1 + zlib.crc32(g.encode("utf-8")) % (dim - 1) for g in vocab}
        return cls(buckets, idf, dim, n, ngrams)

    def encode(
        self, texts: Sequence[str], batch_size: int = 4096, progress: bool = False
    ) -> np.ndarray:
        """`float32[N, dim]`, rows L2-normalised (all-zero for a text without word characters)."""
        out = np.zeros((len(texts), self.dim), np.float32)
        buckets, idf = self.buckets, self.idf
        with _progress(len(texts), "encode (lexical)", progress) as bar:
            for i, text in enumerate(texts):
                row, oov = out[i], 0.0
                for gram, count in collections.Counter(self.grams(text, self.ngrams)).items():
                    b = buckets.get(gram)
                    tf = 1.0 + math.log(count)
                    if b is None:
                        oov += (tf * self.oov_idf) ** 2
                    else:
                        row[b] += tf * idf[gram]
                row[0] = math.sqrt(oov)
                norm = float(np.linalg.norm(row))
                if norm > 0:
                    row /= norm
                if (i + 1) % batch_size == 0:
                    bar.update(batch_size)
            bar.update(len(texts) % batch_size)
        return out
