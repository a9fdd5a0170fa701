r"""Respond with a trained model to a real video and a conversation.

    python -m tiktalk_jax.respond --workdir=runs/maria_tvak --video=clip.mp4 \
        --context="第一句" --context="第二句" [--title="视频标题"] [--num_responses=5] \
        [--checkpoint_step=latest|N] [--interactive] [--knowledge_encoder=SBERT_DIR]

prints the top responses of beam search (its final hypotheses, best first) with their scores,
`sum log p / (1 + length) ** length_penalty` as the beam ranks them. `--interactive` keeps a
conversation going: every line read from stdin is a new turn appended to the context, the
model's best reply is appended after it, until EOF, an empty line or `/quit`.

The inputs are made exactly as the run's training data were:
  * the video is decoded by the dataset builder's own code (`tfds_builder/tiktalk/media.py`,
    with the options of the media build: frames per second, at most `max_frames`, frame size,
    16 kHz mono audio);
  * the frozen encoders are rebuilt from each features dataset's `metadata.json` (encoder, its
    weights and their sha256, or the random-init seed and config) and run through the
    extraction's own jitted runner, assembly and storage dtype (`tiktalk_jax/extract.py`);
  * features are standardized with the train-split statistics the input pipeline used
    (`maria.feature_stats`), knowledge is retrieved for context + title with the retriever the
    knowledge table was prepared with (rebuilt from its `manifest.json`; a sentence-transformers
    encoder's directory is not recorded there: pass `--knowledge_encoder`), and the batch is
    made by the family's own formatter;
  * decoding uses the run's `config.decode`, with `num_keep_best` final hypotheses.

Supported: the Maria family (every variant). Other families fail with a message naming it.
Errors (missing or undecodable video, empty context, a workdir without a checkpoint) are
printed as `respond: error: ...` with exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

QUIT = "/quit"


class RespondError(Exception):
    """A problem with the user's input or run, reported without a traceback."""


@dataclasses.dataclass(frozen=True)
class Response:
    text: str
    score: float  # beam score: sum log p / (1 + length) ** length_penalty


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


def load_run(workdir: str, step: str | int = "latest") -> tuple[Any, int]:
    """(config, checkpoint step) of the Maria run in `workdir`; RespondError when there is no
    run, no such checkpoint or another model family."""
    from tiktalk_jax import export

    try:
        config = export.load_run_config(workdir)
        _check_family(config)
        return config, export.choose_step(workdir, step)
    except export.ExportError as e:
        raise RespondError(str(e)) from None


def video_tables(config: Any) -> list[str]:
    """The feature tables ("frames", "audio") the run's Maria variant reads."""
    from tiktalk_jax.models import maria, maria_inputs

    vision, audio, _ = maria.variant_flags(config.model.variant)
    return [t for t, used in ((maria_inputs.FRAMES, vision), (maria_inputs.AUDIO, audio)) if used]


def _check_family(config: Any) -> None:
    name = config.model.name
    if name != "maria":
        raise RespondError(
            f"model family {name!r} is not supported by respond (supported: maria): it needs "
            "the family's per-video features computed from a video file and all final beams "
            "with their scores, which are implemented for Maria only"
        )


# ---------------------------------------------------------------------------------------------
# Video -> features, as the builder and the extraction made them.
# ---------------------------------------------------------------------------------------------


def media_options(features_metadata: dict[str, Any]) -> Any:
    """The builder's `MediaOptions` of the media build the features were extracted from: the
    metadata's `media_options`, else the media build report's options, else the defaults."""
    from tfds_builder.tiktalk import media
    from tfds_builder.tiktalk.report import REPORT_NAME

    options = dict(features_metadata.get("media_options") or {})
    media_dir = features_metadata.get("media_dir")
    report = os.path.join(media_dir, REPORT_NAME) if media_dir else None
    if not options and report and os.path.isfile(report):
        with open(report, encoding="utf-8") as f:
            options = json.load(f).get("options", {})
    names = {f.name for f in dataclasses.fields(media.MediaOptions)}
    return media.MediaOptions(**{k: v for k, v in options.items() if k in names})


def decode_video(path: str, options: Any) -> dict[str, Any]:
    """`media.decode_video` with the video's id (its file stem, as the builder names videos);
    RespondError for a missing or undecodable file."""
    from tfds_builder.tiktalk import media

    if not os.path.isfile(path):
        raise RespondError(f"video {path!r} does not exist")
    try:
        record = media.decode_video(path, options)
    except media.DecodeError as e:
        raise RespondError(f"video {path!r} cannot be used ({e.reason}): {e}") from None
    except Exception as e:  # PyAV raises its own error types for broken files
        raise RespondError(f"video {path!r} cannot be decoded: {type(e).__name__}: {e}") from None
    record["video_id"] = os.path.splitext(os.path.basename(path))[0]
    return record


class FeatureEncoder:
    """The frozen encoder of one features dataset, rebuilt from its metadata, on one device.

    `encoder(record) -> float32[n, D]`: the features `extract` would store for the media record
    (same preprocessing, batch shape, assembly and storage dtype), standardized with `stats`
    `(mean, std)` when given.
    """

    def __init__(self, directory: str, stats: tuple[np.ndarray, np.ndarray] | None = None):
        import jax

        from tiktalk_jax import encoders, extract, features

        meta = features.read_metadata(directory)
        pretrained = None if meta["random_init"] else meta["weights"]
        if pretrained:
            found = encoders.weights_info(pretrained, meta["seed"]).get("sha256")
            if found != meta.get("sha256"):
                raise RespondError(
                    f"{directory} was extracted with weights {pretrained} of sha256 "
                    f"{meta.get('sha256')}; the files there now hash to {found}"
                )
        self.encoder = encoders.build_encoder(
            meta["encoder"],
            pretrained,
            seed=meta["seed"],
            dtype=meta["compute_dtype"],
            model_config=None if pretrained else meta["model_config"],
            frame_tokens=int(meta.get("frame_tokens", 0)),
        )
        self.runner = extract.Runner(self.encoder, jax.devices()[:1], None)
        self.storage = np.dtype(encoders.DTYPES[meta["storage_dtype"]])
        self.metadata, self.stats = meta, stats

    def __call__(self, record: dict[str, Any]) -> np.ndarray:
        from tiktalk_jax import encoders, extract

        try:
            prepared = self.encoder.prepare(record)
        except encoders.CorruptMedia as e:
            raise RespondError(f"video {record['video_id']!r}: {e}") from None
        items, bs = prepared.items, self.runner.batch_size
        outputs = [np.zeros((0, *self.runner.output_shape), np.float32)]
        for start in range(0, len(items), bs):
            chunk = np.zeros((bs, *self.encoder.item_shape), np.float32)
            part = items[start : start + bs]
            chunk[: len(part)] = part
            outputs.append(np.asarray(self.runner(chunk), np.float32)[: len(part)])
        out = self.encoder.assemble(record["video_id"], prepared, np.concatenate(outputs))
        out = extract._to_storage(self.encoder, out, self.storage)
        feats = np.asarray(out["features"], np.float32)
        if self.stats is not None and feats.size:
            feats = (feats - self.stats[0]) / self.stats[1]
        return feats


# ---------------------------------------------------------------------------------------------
# Knowledge for a query, as the knowledge table was prepared.
# ---------------------------------------------------------------------------------------------


def knowledge_retriever(directory: str, encoder_dir: str | None = None) -> Any:
    """The `KnowledgeRetriever` that wrote the knowledge table in `directory` (its manifest:
    KG file and hash, encoder identity, retrieval options)."""
    from tiktalk_jax.knowledge import c3kg, prepare, retrieval, sentence_encoder

    path = os.path.join(directory, prepare.MANIFEST)
    if not os.path.isfile(path):
        raise RespondError(f"no knowledge manifest {path}: the run's knowledge table is missing")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if not os.path.isfile(manifest["kg"]):
        raise RespondError(f"the knowledge graph {manifest['kg']} of {path} is missing")
    kg = c3kg.read_tsv(manifest["kg"])
    if kg.sha256 != manifest["kg_sha256"]:
        raise RespondError(f"{manifest['kg']} changed since {directory} was prepared (sha256)")
    identity = manifest["encoder"]
    if encoder_dir:
        encoder = sentence_encoder.SentenceEncoder.from_pretrained(encoder_dir)
    elif identity.startswith("lexical-"):
        dim = int(identity.split("-")[2].removeprefix("d"))  # "lexical-v2-d<dim>-<hash>"
        encoder = sentence_encoder.LexicalEncoder.fit(kg.heads, max_dim=dim)
    elif identity.startswith("random-"):
        encoder = prepare.make_encoder("random", kg)
    else:
        raise RespondError(
            f"{directory} was retrieved with a sentence encoder ({identity}): pass its "
            "directory as --knowledge_encoder"
        )
    if encoder.identity != identity:
        raise RespondError(
            f"the knowledge encoder differs from the one of {directory}: {encoder.identity} "
            f"!= {identity}"
        )
    config = dict(manifest["config"])
    config["families"] = tuple(config["families"]) if config.get("families") else None
    return retrieval.KnowledgeRetriever(kg, encoder, retrieval.RetrievalConfig(**config))


# ---------------------------------------------------------------------------------------------
# The responder.
# ---------------------------------------------------------------------------------------------


class Responder:
    """A restored Maria with everything that makes its inputs; `respond(...)` per turn."""

    def __init__(
        self,
        config: Any,
        workdir: str,
        step: int,
        *,
        num_responses: int | None = None,
        knowledge_encoder: str | None = None,
    ):
        import jax
        from flax import nnx

        from tiktalk_jax import evaluate, export, input_pipeline
        from tiktalk_jax.models import maria, registry

        _check_family(config)
        self.config, self.step = config, step
        self.tokenizer = maria.family_tokenizer(config)
        self.model = export.restore_model(config, workdir, step)
        mc = self.model.config
        cfg = config.input.to_dict()
        cfg["num_references"] = 0
        self.format = input_pipeline.get_formatter(
            "maria", type(config.input)(cfg), self.tokenizer, train=False
        )
        stats = export.run_feature_stats(config)
        self.encoders = {
            table: FeatureEncoder(maria.features_dir(config, table), stats.get(table))
            for table in video_tables(config)
        }
        self.retriever = (
            knowledge_retriever(maria.knowledge_dir(config), knowledge_encoder)
            if mc.use_knowledge
            else None
        )
        search, options = maria.decode_settings(config, mc)
        n = 1 if options["greedy"] else int(num_responses or search.num_beams)
        self.search = dataclasses.replace(search, num_keep_best=n)
        graphdef, self._state = nnx.split(self.model)
        search = self.search
        self._generate = jax.jit(
            lambda state, batch: maria.generate(
                nnx.merge(graphdef, state), batch, search, **options
            )
        )
        # Hypotheses become text exactly as evaluation writes them (the family's hook).
        self._decode_text = registry.get(config.model.name).decode_text or evaluate.decode_texts

    def video_features(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        """Side records of a decoded video: `{table: float32[n, D]}` (standardized)."""
        return {table: encoder(record) for table, encoder in self.encoders.items()}

    def knowledge(self, context: Sequence[str], title: str = "") -> str:
        """The retrieved knowledge text for the context and title ("" without knowledge)."""
        if self.retriever is None:
            return ""
        (result,) = self.retriever.retrieve([{"context": list(context), "title": title}])
        return result["knowledge"]

    def respond(
        self,
        context: Sequence[str],
        *,
        title: str = "",
        features: dict[str, np.ndarray] | None = None,
    ) -> tuple[list[Response], str]:
        """The final beams for the conversation `context` (oldest turn first): `(responses best
        first, the knowledge text used)`."""
        context = [t.strip() for t in context if t.strip()]
        if not context:
            raise RespondError("the context is empty: give at least one non-empty turn")
        knowledge = self.knowledge(context, title)
        record: dict[str, Any] = {
            "dialogue_id": "respond",
            "video_id": "respond",
            "title": title,
            "context": context,
            "responses": [],
            "knowledge": {"knowledge": knowledge},
        }
        for table, feats in (features or {}).items():
            record[table] = {"features": feats}
        missing = sorted(set(self.encoders) - set(features or {}))
        if missing:
            raise RespondError(
                f"this {self.config.model.variant} model needs a --video ({missing})"
            )
        batch = self.format([record])
        out = self._generate(self._state, batch)
        tokens = np.asarray(out.tokens).reshape(-1, self.search.max_new_tokens)
        scores = np.asarray(out.scores).reshape(-1)
        texts = self._decode_text(self.config, self.tokenizer, tokens)
        responses = [Response(t, float(s)) for t, s in zip(texts, scores) if np.isfinite(s)]
        return responses, knowledge


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def _print_turn(out: TextIO, context, responses: Sequence[Response], knowledge: str | None):
    print(f"context: {' / '.join(context)}", file=out)
    if knowledge is not None:
        print(f"knowledge: {knowledge or '<none retrieved>'}", file=out)
    for i, r in enumerate(responses, 1):
        print(f"  {i}. [{r.score:.4f}] {r.text or '<empty>'}", file=out)
    out.flush()


def converse(
    responder: Responder,
    context: list[str],
    *,
    title: str = "",
    features: dict[str, np.ndarray] | None = None,
    interactive: bool = False,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
) -> list[str]:
    """One-shot: prints the responses to `context`. Interactive: also reads turns from `stdin`
    until EOF, an empty line or /quit, appending each turn and the best reply to the context.
    Returns the final context."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    show_knowledge = responder.retriever is not None
    context = [t for t in context if t.strip()]

    def turn():
        responses, knowledge = responder.respond(context, title=title, features=features)
        _print_turn(out, context, responses, knowledge if show_knowledge else None)
        if responses and responses[0].text:
            context.append(responses[0].text)

    if context or not interactive:
        turn()
    while interactive:
        if stdin.isatty():
            print("you> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line or not line.strip() or line.strip() == QUIT:
            break
        context.append(line.strip())
        turn()
    return context


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="the training run's workdir")
    p.add_argument("--video", default=None, help="a video file (mp4, ...)")
    p.add_argument("--context", action="append", default=[], help="a turn (repeat, oldest first)")
    p.add_argument("--title", default="", help="the video's title (used by knowledge retrieval)")
    p.add_argument("--num_responses", type=int, default=None, help="default: the beam width")
    p.add_argument("--checkpoint_step", default="latest", help="'latest' or a step number")
    p.add_argument("--interactive", action="store_true", help="read more turns from stdin")
    p.add_argument("--knowledge_encoder", default=None, help="sentence-transformers dir")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """The command line's work; raises RespondError for user errors."""
    if not args.interactive and not any(t.strip() for t in args.context):
        raise RespondError("the context is empty: give at least one non-empty --context")
    if args.num_responses is not None and args.num_responses < 1:
        raise RespondError("--num_responses must be >= 1")
    config, step = load_run(args.workdir, args.checkpoint_step)
    tables = video_tables(config)
    if tables and args.video is None:
        raise RespondError(f"this {config.model.variant} model needs a --video ({tables})")
    record = None
    if args.video is not None:  # decoded before the model is built: a bad file fails fast
        from tiktalk_jax import features as features_lib
        from tiktalk_jax.models import maria

        meta = features_lib.read_metadata(maria.features_dir(config, tables[0])) if tables else {}
        record = decode_video(args.video, media_options(meta))
    responder = Responder(
        config,
        args.workdir,
        step,
        num_responses=args.num_responses,
        knowledge_encoder=args.knowledge_encoder,
    )
    features = responder.video_features(record) if record is not None else None
    converse(
        responder,
        list(args.context),
        title=args.title,
        features=features,
        interactive=args.interactive,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        run(args)
    except RespondError as e:
        print(f"respond: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
