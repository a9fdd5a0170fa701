r"""BLIP-2 on the bundled sample: do the visual variants beat the text-only LLM on replies that
need vision? Writes docs/blip2_vision.md's tables.

    python benchmarks/blip2_vision.py --workdir=/tmp/blip2_vision [--variants=img,video,temporal]
        [--llm=tiny|reading] [--llm_steps=N] [--steps=N] [--seeds=0,1,2 --splits=test,val]
        [--out=FILE] [--probe]

Steps (each reused when --workdir already has its output):
  1. the sample prepared as `make demo` does (`main.prepare_sample`: release, TFDS build, vocab);
  2. vit_g features from the tiny RANDOM-INIT ViT (`SAMPLE_VIT`) with per-frame tokens of 4 frames
     (`--frame_tokens=4`), into DATA/features/vit_g (where configs/blip2.py looks);
  3. the text-only LLM baseline: configs/llm_text.py:size=tiny,lora=false (full fine-tuning of
     the tiny random-init decoder), --llm_steps steps -> WORKDIR/runs/llm_text; with
     --llm=reading, size=small trained on the dialogues plus `caption_copies` (2,000 steps) ->
     WORKDIR/runs/llm_reading, a frozen LLM that reads a caption written in its prompt, as the
     paper's pre-trained one does (the BLIP-2 runs' directories then end in _reading);
  4. BLIP-2 img / video / temporal (configs/blip2.py:size=tiny) on that run's LLM, frozen
     (llm_run), --steps steps each -> WORKDIR/runs/blip2_<variant>;
  5. every run's final model evaluated on test (per-kind scores from raw/sample_kinds.json);
     a markdown table per reply kind (vision / audio / knowledge / text).

--seeds=0,1,2 trains every variant once per seed (caption stage included) and adds a summary
over seeds; --splits=test,val evaluates the summary on both held-out splits (n = 14 vision
replies each): a seed's value is its mean over the splits, a variant's the mean and standard
deviation over seeds, with the same control (another video's frames) and colour counts.

--probe adds the measurements of docs/blip2_vision.md: least-squares probes of colour and shape
on the ViT tokens (train videos -> held-out val + test videos), and how much the trained
Q-Former's prefix varies between videos compared with its size.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiktalk_jax import main as entry  # noqa: E402

KINDS = entry.ABLATION_KINDS
METRICS = {"bleu2": "BLEU-2", "cider": "CIDEr", "recall@1": "Recall@1", "mean_rank": "MeanRank"}
FRAME_TOKENS = 4  # the sample's 4 s videos at 1 fps: every frame
# The tiny random-init ViT of the CPU smoke run (configs/blip2.py's docstring): 64-d, 2 layers.
SAMPLE_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
LLM_STEPS = 600
READING_STEPS = 2000  # the small LLM's: it reads captions after ~2,000 (docs/blip2_vision.md)
BLIP2_STEPS = 300
CAPTION_STEPS = 2000  # configs/blip2.py's tiny caption stage


def prepare(workdir: str) -> tuple[str, str]:
    """The sample's data dir and kinds file, prepared unless `workdir` has them."""
    from tiktalk_jax import input_pipeline, tokenizer

    data_dir, raw_dir = os.path.join(workdir, "data"), os.path.join(workdir, "raw")
    try:
        vocab = os.path.join(input_pipeline.dataset_dir(data_dir), tokenizer.VOCAB_FILENAME)
    except FileNotFoundError:  # not built yet
        vocab = ""
    if not os.path.isfile(vocab):
        entry.prepare_sample(workdir, seed=0)
    return data_dir, os.path.join(raw_dir, "sample_kinds.json")


def extract_vit(data_dir: str) -> str:
    """The tiny random-init vit_g features (with `frame_features`) of every media split."""
    from tiktalk_jax import encoders, extract, features

    directory = os.path.join(data_dir, "features", "vit_g")
    if os.path.isfile(os.path.join(directory, features.METADATA_NAME)):
        return directory
    media = extract.media_dir(data_dir)
    sources = {s: extract.open_media(media, s) for s in extract.media_splits(media)}
    encoder = encoders.build_encoder("vit_g", model_config=SAMPLE_VIT, frame_tokens=FRAME_TOKENS)
    start = time.perf_counter()
    extract.extract_dataset(encoder, sources, directory, progress=False, media=dict(dir=media))
    print(f"  vit_g RANDOM-INIT {SAMPLE_VIT} -> {directory} {time.perf_counter() - start:.0f} s")
    return directory


def _schedule(config, steps: int) -> None:
    config.total_steps = config.checkpoint_every = steps
    config.log_every = max(1, min(100, steps // 6))
    config.eval.skip_meteor = True  # not in the tables; needs Java


def llm_config(data_dir: str, kinds: str, steps: int, size: str = "tiny"):
    from configs import llm_text

    arg = f"size={size},lora=false,data_dir={data_dir},kinds_file={kinds}"
    config = llm_text.get_config(arg)
    _schedule(config, steps)
    return config


def captioned_title(colour: str, shape: str, title) -> str:
    """The title with a caption written before it, "一个<colour>的<shape>，<title>" (Chinese
    colour and shape words): how `caption_copies` and `colour_choice(caption_title=True)` put
    a caption into a text LLM's prompt."""
    from tiktalk_jax import sample
    from tiktalk_jax.input_pipeline import as_text

    return sample.CAPTION_TEMPLATES[0].format(c=colour, s=shape) + "，" + as_text(title)


def caption_copies(records: list[dict], attrs: dict[str, dict]) -> list[dict]:
    """Counterfactual caption copies that teach a text LLM to read its prompt. For every train
    dialogue whose video has known attributes (`video_attributes`; bad videos skipped), a copy
    whose title starts with the caption of a RANDOM colour and shape ("一个<c>的<s>，" + title)
    and whose context and replies have the video's colour and shape words replaced by those:
    only the title tells the copy's colour, so reading it pays, while the original dialogues
    (no caption) leave the LLM blind to the true colour, as a text-only baseline must be. The
    draw is seeded by the dialogue id (the same copies in any order or process)."""
    import random

    from tiktalk_jax import sample
    from tiktalk_jax.input_pipeline import as_text

    colours, shapes = [w for w, _ in sample.COLOURS.values()], list(sample.SHAPES.values())
    out = []
    for record in records:
        a = attrs.get(as_text(record["video_id"]))
        if a is None or a.get("bad"):
            continue
        dialogue_id = as_text(record["dialogue_id"])
        rng = random.Random(dialogue_id)
        old = (sample.COLOURS[a["colour"]][0], sample.SHAPES[a["shape"]])
        new = (rng.choice(colours), rng.choice(shapes))

        def swap(text, old=old, new=new):  # via placeholders: a new word may be an old one
            text = as_text(text).replace(old[0], "\0").replace(old[1], "\1")
            return text.replace("\0", new[0]).replace("\1", new[1])

        out.append(dict(record, dialogue_id=dialogue_id + "#cap",
                        title=captioned_title(*new, record["title"]),
                        context=[swap(t) for t in record["context"]],
                        responses=[swap(t) for t in record["responses"]]))  # fmt: skip
    return out


def blip2_config(
    variant: str,
    data_dir: str,
    kinds: str,
    llm_run: str,
    steps: int,
    *,
    captions: str | None = None,
    qformer_run: str | None = None,
    **settings,
):
    """configs/blip2.py tiny on `llm_run`'s LLM: the caption stage when `captions` is given
    (the sample's captions file), else the dialogue stage (from `qformer_run`'s Q-Former when
    given). `settings`: lr / batch / dropout overrides (None keeps the config's), caption_mix,
    instruct (instruction-aware queries)."""
    from configs import blip2

    arg = f"variant={variant},size=tiny,data_dir={data_dir},llm_run={llm_run},kinds_file={kinds}"
    if captions:
        arg += f",stage=caption,captions={captions}"
    if qformer_run:
        arg += f",qformer_run={qformer_run}"
    if settings.get("instruct"):
        arg += ",instruct=true"
    if settings.get("caption_mix"):
        arg += f",captions={settings['mix_captions']},caption_mix={settings['caption_mix']}"
    config = blip2.get_config(arg)
    _schedule(config, steps)
    if settings.get("seed") is not None:  # init, dropout and data order of the BLIP-2 runs
        config.seed = config.input.seed = settings["seed"]
    if settings.get("lr"):
        config.optim.lr = settings["lr"]
    if settings.get("batch"):
        config.input.batch_size = settings["batch"]
    if settings.get("dropout") is not None:
        config.model.qformer.hidden_dropout_prob = settings["dropout"]
        config.model.qformer.attention_probs_dropout_prob = settings["dropout"]
    return config


def run(
    config, run_dir: str, train_kinds: str | None = None, extra_train: list | None = None
) -> dict:
    """Trains and evaluates `config` in `run_dir`; a run with its final scores is reused.
    `train_kinds` (e.g. "vision"): train on the dialogues of those kinds only (an ablation);
    `extra_train`: records trained on after the train split's (e.g. `caption_copies`)."""
    from tiktalk_jax import evaluate, input_pipeline
    from tiktalk_jax.models import registry

    path = evaluate.scores_path(run_dir, "test", int(config.total_steps))
    if os.path.isfile(path):
        print(f"  reused {path}")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    datasets = None
    if train_kinds or extra_train:
        src = input_pipeline.open_split(input_pipeline.dataset_dir(config.input.data_dir), "train")
        keep = [dict(src[i]) for i in range(len(src))]
        if train_kinds:
            with open(config.eval.kinds_file, encoding="utf-8") as f:
                kinds = json.load(f)
            wanted = train_kinds.split(",")
            keep = [
                r for r in keep if kinds.get(input_pipeline.as_text(r["dialogue_id"])) in wanted
            ]
        keep += extra_train or []
        inputs = registry.get(config.model.name).data_inputs(config)
        if (inputs["sources"] or {}).get("train") is not None:  # e.g. BLIP-2's caption mix
            raise ValueError(f"{config.model.name} builds its own train source: no train_kinds "
                             "or extra_train with it")  # fmt: skip
        datasets = input_pipeline.make_datasets(
            config, side_tables=inputs["side_tables"], sources={"train": keep}
        )
    scores, trained, evaluated = entry.train_and_evaluate_variant(
        config, run_dir, datasets=datasets
    )
    print(f"  trained {trained:.0f} s, evaluated {evaluated:.0f} s -> {run_dir}", flush=True)
    return scores.scores


def table(scores: dict[str, dict]) -> str:
    """Markdown: a row per (kind, metric), a column per run; the best value in bold."""
    names = list(scores)
    lines = ["| kind | n | metric | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
    for kind in (*KINDS, None):
        first = scores[names[0]]
        n = first["per_kind"][kind]["num_examples"] if kind else first["num_examples"]
        for i, (metric, label) in enumerate(METRICS.items()):
            row = [
                s["per_kind"][kind][metric]
                if kind
                else {**s["nlg_scores"], **s["retrieval"]}[metric]
                for s in scores.values()
            ]
            best = (min if metric == "mean_rank" else max)(row)
            cells = [f"**{x:.1f}**" if x == best and row.count(x) < len(row) else f"{x:.1f}"
                     for x in row]  # fmt: skip
            head = f"| {kind or 'all'} | {n} |" if i == 0 else "| | |"
            lines.append(f"{head} {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Measurements (--probe).
# --------------------------------------------------------------------------------------------


@functools.cache
def video_attributes() -> dict[str, dict]:
    """Every sample video's colour / shape / split (the sample is deterministic in its seed;
    writing it takes seconds, so once per process; callers only read the dict)."""
    from tiktalk_jax import sample

    with tempfile.TemporaryDirectory() as tmp:
        return sample.write_sample(tmp, seed=0)["videos"]


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(0), train.std(0) + 1e-6
    return [(x - mean) / std for x in (train, *others)]


def linear_probe(x_train, y_train, x_test, y_test) -> tuple[int, int]:
    """Least-squares one-vs-rest probe on standardized inputs: (correct, total) on test."""
    x_train, x_test = _standardize(x_train, x_test)
    classes = sorted(set(y_train))
    onehot = np.array([[y == c for c in classes] for y in y_train], np.float64)
    design = lambda x: np.concatenate([x, np.ones((len(x), 1))], 1)  # noqa: E731
    w = np.linalg.lstsq(design(x_train), onehot, rcond=1e-6)[0]
    pred = [classes[i] for i in (design(x_test) @ w).argmax(1)]
    return sum(p == y for p, y in zip(pred, y_test)), len(y_test)


def feature_probes(vit_dir: str) -> dict[str, dict[str, str]]:
    """Colour / shape probes on the stored vit_g `features` (mean over frames): the class token,
    the mean patch token, and all tokens of a pooled 4 x 4 patch grid."""
    from tiktalk_jax import features

    attrs = video_attributes()
    data: dict[str, list] = {"train": [], "heldout": []}
    for split in ("train", "val", "test"):
        table = features.FeatureTable(vit_dir, split)
        for i, video_id in enumerate(table.keys):
            a = attrs.get(video_id)
            if a is None or a.get("bad"):
                continue
            tokens = np.asarray(table[i]["features"], np.float64)
            data["train" if split == "train" else "heldout"].append((tokens, a))
    views = {
        "class token": lambda t: t[0],
        "mean patch token": lambda t: t[1:].mean(0),
        "4x4 pooled patch grid": lambda t: _grid(t[1:], 4).reshape(-1),
    }
    out: dict[str, dict[str, str]] = {}
    for name, view in views.items():
        xs = {k: np.stack([view(t) for t, _ in v]) for k, v in data.items()}
        out[name] = {}
        for attr in ("colour", "shape"):
            ys = {k: [a[attr] for _, a in v] for k, v in data.items()}
            ok, n = linear_probe(xs["train"], ys["train"], xs["heldout"], ys["heldout"])
            out[name][attr] = f"{ok}/{n}"
    return out


def _grid(patches: np.ndarray, g: int) -> np.ndarray:
    side = int(round(np.sqrt(len(patches))))
    x = patches.reshape(side, side, -1)[: side // g * g, : side // g * g]
    return x.reshape(g, side // g, g, side // g, -1).mean((1, 3))


def prefix_probe(run_dir: str) -> dict[str, float]:
    """The trained Q-Former's projected prefix over the test videos: its mean norm per query
    token, the spread between videos, and a colour probe on it (train -> held-out videos)."""
    import jax
    from flax import nnx

    from tiktalk_jax import evaluate, features, sharding
    from tiktalk_jax.models import blip2

    config = evaluate.load_config(run_dir)
    mesh = sharding.make_mesh(config.mesh)
    loader = evaluate.ModelLoader(config, run_dir, mesh)
    model = loader.load(loader.steps()[-1])
    attrs = video_attributes()
    field, frames = config.input.visual_field, int(config.input.visual_frames)
    rows: dict[str, list] = {"train": [], "heldout": []}
    prefix = nnx.jit(lambda m, v, k: m.visual_prefix(v, k)[0])
    for split in ("train", "val", "test"):
        table = features.FeatureTable(blip2.features_dir(config), split)
        for i, video_id in enumerate(table.keys):
            a = attrs.get(video_id)
            if a is None or a.get("bad"):
                continue
            tokens = np.asarray(table[i][field], np.float32)
            tokens = tokens.reshape(-1, *tokens.shape[-2:])[:frames][None]
            with jax.set_mesh(mesh):
                p = np.asarray(prefix(model, tokens, np.ones(tokens.shape[:2], bool)))[0]
            rows["train" if split == "train" else "heldout"].append((p, a))
    every = np.stack([p for v in rows.values() for p, _ in v])
    xs = {k: np.stack([p.reshape(-1) for p, _ in v]) for k, v in rows.items()}
    colour = linear_probe(xs["train"], [a["colour"] for _, a in rows["train"]],
                          xs["heldout"], [a["colour"] for _, a in rows["heldout"]])  # fmt: skip
    embed = np.asarray(model.llm.embed.embedding.get_value())
    return {
        "prefix token norm": float(np.linalg.norm(every, axis=-1).mean()),
        "between-video std / norm": float(every.std(0).mean() / np.abs(every).mean()),
        "word embedding norm": float(np.linalg.norm(embed, axis=-1).mean()),
        "colour probe on the prefix": f"{colour[0]}/{colour[1]}",
    }


class _Run:
    """A trained run's final model with its split's dialogues (side records joined) and
    formatter, for the measurements below."""

    def __init__(self, run_dir: str, split: str):
        from tiktalk_jax import evaluate, input_pipeline, sharding
        from tiktalk_jax.models import registry

        config = evaluate._with_eval_split(evaluate.load_config(run_dir), split)
        self.config, self.family = config, registry.get(config.model.name)
        self.mesh = sharding.make_mesh(config.mesh)
        self.side = self.family.side_tables(config)[split] if self.family.side_tables else []
        data = input_pipeline.make_datasets(config, side_tables={split: self.side}, train=False)
        self.tokenizer, self.source = data.tokenizer, data.eval_sources[split]
        loader = evaluate.ModelLoader(config, run_dir, self.mesh)
        self.model = loader.load(loader.steps()[-1])
        self.kinds = json.load(open(evaluate.find_kinds_file(config), encoding="utf-8"))
        self.format = input_pipeline.get_formatter(
            config.model.name, config.input, self.tokenizer, train=True
        )

    def records(self, kind: str, caption_title: bool = False) -> list[dict]:
        """The split's dialogues of `kind`; `caption_title`: the video's true caption written
        before the title, as `caption_copies` write theirs."""
        from tiktalk_jax import sample
        from tiktalk_jax.input_pipeline import as_text

        attrs = video_attributes() if caption_title else {}
        out = []
        for i in range(len(self.source)):
            record = dict(self.source[i])
            if self.kinds.get(as_text(record["dialogue_id"])) != kind:
                continue
            for t in self.side:
                record[t.name] = t.source[t.index()[as_text(record[t.dialogue_field])]]
            a = attrs.get(as_text(record["video_id"]))
            if a and not a.get("bad"):
                colour, shape = sample.COLOURS[a["colour"]][0], sample.SHAPES[a["shape"]]
                record["title"] = captioned_title(colour, shape, record["title"])
            out.append(record)
        return out

    def batches(self, records: list[dict], blind: bool, size: int = 32):
        """Formatted batches of `size` (the last padded, `example_mask` False on padding)."""
        for start in range(0, len(records), size):
            rows = records[start : start + size]
            mask = np.arange(size) < len(rows)
            rows = rows + [rows[0]] * (size - len(rows))
            batch = {**self.format(rows), "example_mask": mask}
            if blind:
                batch["visual_mask"] = np.zeros_like(batch["visual_mask"])
            yield rows, batch


def kind_losses(run_dir: str, split: str, *, blind: bool = False) -> dict[str, float]:
    """Teacher-forced response loss (nats per token) of the run's final model on the dialogues
    of each kind of `split` (their first reference); `blind`: BLIP-2 without its frames."""
    import jax
    from flax import nnx

    r = _Run(run_dir, split)

    @nnx.jit
    def summed(model, batch):
        loss, aux = r.family.loss_fn(model, batch)
        return loss * aux["tokens"], aux["tokens"]

    out = {}
    for kind in KINDS:
        total = count = 0.0
        for _, batch in r.batches(r.records(kind), blind):
            with jax.set_mesh(r.mesh):
                loss, tokens = summed(r.model, batch)
            total, count = total + float(loss), count + float(tokens)
        out[kind] = round(total / count, 3)
    return out


def colour_choice(
    run_dir: str, split: str, *, blind: bool = False, caption_title: bool = False
) -> str:
    """Does the model know the colour? For every vision dialogue of `split` whose first
    reference names one colour, the reference with each of the sample's 4 colour words put in
    (all 2 characters) is scored by the model's likelihood; returns `right/total` argmaxes.
    `caption_title`: the true caption written before the title (does a text LLM read it?)."""
    import jax
    from flax import nnx

    from tiktalk_jax import input_pipeline, sample

    r = _Run(run_dir, split)
    words = [w for w, _ in sample.COLOURS.values()]
    score = nnx.jit(lambda m, b: r.family.score(m, b, r.config))
    right = total = 0
    records = []
    for record in r.records("vision", caption_title):
        reply = input_pipeline.as_text(list(record["responses"])[0])
        named = [w for w in words if w in reply]
        if len(named) == 1:
            records.append(
                (record, [reply.replace(named[0], w) for w in words], words.index(named[0]))
            )
    for start in range(0, len(records), 32):
        chunk = records[start : start + 32]
        for rows, batch in r.batches([c[0] for c in chunk], blind):
            cands = [c[1] for c in chunk] + [chunk[0][1]] * (len(rows) - len(chunk))
            ids, mask = r.family.encode_candidates(r.config, r.tokenizer, cands)
            with jax.set_mesh(r.mesh):
                s = np.asarray(
                    score(r.model, {**batch, "candidate_ids": ids, "candidate_mask": mask})
                )
            pred = s[: len(chunk)].argmax(1)
            right += int(sum(p == c[2] for p, c in zip(pred, chunk)))
            total += len(chunk)
    return f"{right}/{total}"


def split_scores(run_dir: str, split: str) -> dict:
    """The run's final model's scores on `split` (evaluated once, then read from its file)."""
    from tiktalk_jax import evaluate

    config = evaluate.load_config(run_dir)
    path = evaluate.scores_path(run_dir, split, int(config.total_steps))
    if not os.path.isfile(path):  # the latest checkpoint (a stopped run's may not be the last)
        (result,) = evaluate.evaluate(config, run_dir, split=split, skip_meteor=True)
        return result.scores
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shuffled_video_scores(run_dir: str, split: str = "test") -> dict:
    """The run's final model evaluated on `split` with every dialogue given the frames of
    ANOTHER video (the next example of its eval batch with a different video id): if the gains
    over the text LLM come from reading the video, they vanish here. Evaluates a copy of the
    run (once: later calls read its scores file)."""
    import shutil

    from tiktalk_jax import evaluate
    from tiktalk_jax.input_pipeline import as_text
    from tiktalk_jax.models import blip2_inputs

    copy = run_dir.rstrip("/") + "_shuffled_video"
    if not os.path.isdir(copy):
        shutil.copytree(os.path.join(run_dir, "checkpoints"), os.path.join(copy, "checkpoints"))
        shutil.copy(os.path.join(run_dir, "config.json"), copy)
    done = evaluate.scores_path(copy, split, int(evaluate.load_config(copy).total_steps))
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as f:
            return json.load(f)
    original = blip2_inputs.Blip2Formatter.__call__

    def other_videos(self, records):
        batch = original(self, records)
        ids = [as_text(r["video_id"]) for r in records]
        n = len(ids)
        pick = [next(((i + k) % n for k in range(1, n) if ids[(i + k) % n] != ids[i]), i)
                for i in range(n)]  # fmt: skip
        batch["visual"], batch["visual_mask"] = batch["visual"][pick], batch["visual_mask"][pick]
        return batch

    blip2_inputs.Blip2Formatter.__call__ = other_videos
    try:
        config = evaluate.load_config(copy)
        (result,) = evaluate.evaluate(config, copy, split=split, skip_meteor=True)
    finally:
        blip2_inputs.Blip2Formatter.__call__ = original
    return result.scores


def seed_measurements(run_dir: str, splits: list[str], *, visual: bool = True) -> dict:
    """What the multi-seed summary reads from one run, per split: the vision replies' metrics
    with the run's own frames and (`visual`) another video's, the text replies' CIDEr and the
    colour chosen right (with and without frames)."""
    out = {}
    for split in splits:
        s = split_scores(run_dir, split)
        m = {"own": {k: s["per_kind"]["vision"][k] for k in METRICS},
             "text_cider": s["per_kind"]["text"]["cider"],
             "colour": colour_choice(run_dir, split)}  # fmt: skip
        if visual:
            other = shuffled_video_scores(run_dir, split)
            m["another"] = {k: other["per_kind"]["vision"][k] for k in METRICS}
            m["colour_blind"] = colour_choice(run_dir, split, blind=True)
        out[split] = m
    return out


def _ratio_sum(values: list[str]) -> str:
    pairs = [tuple(int(x) for x in v.split("/")) for v in values]
    return f"{sum(p[0] for p in pairs)}/{sum(p[1] for p in pairs)}"


def seed_summary(llm: dict, runs: dict[str, dict[int, dict]]) -> str:
    """Markdown tables over seeds. `llm`: the text LLM's `seed_measurements` (`visual=False`);
    `runs[variant][seed]`: each BLIP-2 run's. A seed's value of a metric is its mean over the
    splits; a variant's cell is the mean over its seeds and their standard deviation, and the
    last column counts the seeds whose value beats the text LLM's (higher, or lower for
    MeanRank)."""
    splits = list(llm)

    def per_seed(m: dict, key: str, metric: str) -> float:
        return float(np.mean([m[split][key][metric] for split in splits]))

    base = {k: per_seed(llm, "own", k) for k in METRICS}
    head = "| run | frames | seeds | " + " | ".join(METRICS.values())
    lines = [head + " | seeds beating the text LLM |", "|---" * (len(METRICS) + 4) + "|"]
    lines.append("| LLM (text) | - | - | " + " | ".join(f"{base[k]:.1f}" for k in METRICS)
                 + " | - |")  # fmt: skip
    for variant, seeds in runs.items():
        for key, label in (("own", "own"), ("another", "another video")):
            cells, wins = [], []
            for k in METRICS:
                values = np.array([per_seed(m, key, k) for m in seeds.values()])
                cells.append(f"{values.mean():.1f} ± {values.std():.1f}")
                better = values < base[k] if k == "mean_rank" else values > base[k]
                wins.append(f"{int(better.sum())}/{len(values)}")
            lines.append(f"| BLIP-2 {variant} | {label} | {len(seeds)} | " + " | ".join(cells)
                         + f" | {' / '.join(wins)} |")  # fmt: skip
    colour = ["", "| run | colour right, own frames | without frames | text replies' CIDEr |",
              "|---|---|---|---|",
              f"| LLM (text) | {_ratio_sum([llm[s]['colour'] for s in splits])} | - | "
              f"{np.mean([llm[s]['text_cider'] for s in splits]):.1f} |"]  # fmt: skip
    for variant, seeds in runs.items():
        ms = list(seeds.values())
        own = _ratio_sum([m[s]["colour"] for m in ms for s in splits])
        blind = _ratio_sum([m[s]["colour_blind"] for m in ms for s in splits])
        cider = np.mean([m[s]["text_cider"] for m in ms for s in splits])
        colour.append(f"| BLIP-2 {variant} ({len(ms)} seeds) | {own} | {blind} | {cider:.1f} |")
    return "\n".join(lines + colour)


def caption_colour_choice(run_dir: str, split: str, *, blind: bool = False) -> str:
    """Does the Q-Former tell the frozen LLM the colour, with no text to lean on? For every
    video of `split` with features, the caption prompt alone (no title, no context) and the
    caption "一个<colour>的<shape>" with each of the 4 colour words are scored by the run's
    model; returns `right/total` argmaxes (chance 25%). `blind`: without the frames."""
    import jax
    from flax import nnx

    from tiktalk_jax import evaluate, features, input_pipeline, sample, sharding
    from tiktalk_jax.models import blip2, blip2_captions, registry

    config = evaluate.load_config(run_dir)
    family = registry.get(config.model.name)
    mesh = sharding.make_mesh(config.mesh)
    loader = evaluate.ModelLoader(config, run_dir, mesh)
    model = loader.load(loader.steps()[-1])
    tok = input_pipeline.make_datasets(config, train=False).tokenizer
    fmt = input_pipeline.get_formatter(config.model.name, config.input, tok, train=True)
    score = nnx.jit(lambda m, b: family.score(m, b, config))
    attrs, words = video_attributes(), [w for w, _ in sample.COLOURS.values()]
    table = features.FeatureTable(blip2.features_dir(config), split)
    right = total = 0
    for i, video_id in enumerate(table.keys):
        a = attrs.get(video_id)
        if a is None or a.get("bad"):
            continue
        record = dict(video_id=video_id, title="", context=[blip2_captions.DEFAULT_PROMPT],
                      responses=["-"], visual=table[i])  # fmt: skip
        batch = {**fmt([record]), "example_mask": np.ones(1, bool)}
        if blind:
            batch["visual_mask"] = np.zeros_like(batch["visual_mask"])
        shape = sample.SHAPES[a["shape"]]
        cands = [[sample.CAPTION_TEMPLATES[0].format(c=w, s=shape) for w in words]]
        ids, mask = family.encode_candidates(config, tok, cands)
        with jax.set_mesh(mesh):
            s = np.asarray(score(model, {**batch, "candidate_ids": ids, "candidate_mask": mask}))
        right += int(s[0].argmax() == words.index(sample.COLOURS[a["colour"]][0]))
        total += 1
    return f"{right}/{total}"


def _video_id(record: dict) -> str:
    from tiktalk_jax.input_pipeline import as_text

    return as_text(record["video_id"])


def soft_prompt_oracle(run_dir: str, steps: int = 300, lr: float = 1e-2) -> dict[str, str]:
    """Can ANY prefix make the run's frozen LLM name the colour? Trains a free prefix per
    colour (`float[4, Q, D]`, a perfect visual encoder's output; Adam, full batch of the train
    vision dialogues) through the frozen LLM, and counts the colour tokens it predicts right
    (teacher-forced, argmax over the 4 colours' first tokens) on train and test."""
    import jax
    import jax.numpy as jnp
    import optax

    from tiktalk_jax import sample
    from tiktalk_jax.models import blip2, losses

    attrs = video_attributes()
    colours = sorted({a["colour"] for a in attrs.values()})
    runs = {split: _Run(run_dir, split) for split in ("train", "test")}
    lm = blip2._eval_copy(runs["train"].model).llm
    tok = runs["train"].tokenizer
    first = [tok(sample.COLOURS[c][0], add_special_tokens=False)["input_ids"][0] for c in colours]

    def data(r: _Run):
        records = [x for x in r.records("vision") if _video_id(x) in attrs]
        ((_, batch),) = r.batches(records, False, size=len(records))
        return batch, np.array([colours.index(attrs[_video_id(x)]["colour"]) for x in records])

    def logits(prefix, batch, colour):
        parts = [prefix[colour], lm.embed_tokens(batch["prompt_ids"]),
                 lm.embed_tokens(batch["response_ids"])]  # fmt: skip
        x = jnp.concatenate(parts, 1)
        mask = jnp.concatenate([jnp.ones(parts[0].shape[:2], bool),
                                jnp.asarray(batch["prompt_mask"], bool),
                                jnp.asarray(batch["response_mask"], bool)], 1)  # fmt: skip
        hidden, _ = lm.hidden_states(attention_mask=mask, inputs_embeds=x)
        start, lr_ = x.shape[1] - parts[2].shape[1], parts[2].shape[1]
        return lm.logits(hidden[:, start - 1 : start + lr_ - 1]).astype(jnp.float32)

    def accuracy(prefix, batch, colour) -> str:
        out, ids = np.asarray(logits(prefix, batch, colour)), np.asarray(batch["response_ids"])
        right = n = 0
        for i in range(len(colour)):
            pos = np.flatnonzero(np.isin(ids[i], first))
            if len(pos):
                n += 1
                right += int(np.argmax(out[i, pos[0], first]) == colour[i])
        return f"{right}/{n}"

    train_batch, train_colour = data(runs["train"])
    test_batch, test_colour = data(runs["test"])
    shape = (len(colours), runs["train"].model.num_queries, lm.config.hidden_size)
    prefix = jnp.asarray(np.random.default_rng(0).normal(size=shape) * 0.02, jnp.float32)
    opt = optax.adam(lr)
    state = opt.init(prefix)

    @jax.jit
    def step(prefix, state):
        def loss(p):
            out = logits(p, train_batch, train_colour)
            ids, mask = train_batch["response_ids"], train_batch["response_mask"]
            return losses.response_cross_entropy(out, ids, mask, None)[0]

        grads = jax.grad(loss)(prefix)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(prefix, updates), state

    before = accuracy(prefix, train_batch, train_colour)
    for _ in range(steps):
        prefix, state = step(prefix, state)
    return {
        "train before": before,
        "train after": accuracy(prefix, train_batch, train_colour),
        "test after": accuracy(prefix, test_batch, test_colour),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--variants", default="img,video,temporal")
    p.add_argument(
        "--llm",
        default="tiny",
        choices=("tiny", "reading"),
        help="the frozen LLM: tiny (64-d, the dialogues only) or reading (small, "
        "128-d, the dialogues + caption_copies: it reads captions in its prompt)",
    )
    p.add_argument(
        "--llm_steps",
        type=int,
        default=None,
        help=f"the text LLM's steps (tiny: {LLM_STEPS}, reading: {READING_STEPS})",
    )
    p.add_argument("--caption_steps", type=int, default=CAPTION_STEPS,
                   help="the caption stage's steps per variant; 0: no caption stage")  # fmt: skip
    p.add_argument("--steps", type=int, default=BLIP2_STEPS, help="dialogue stage steps")
    p.add_argument("--lr", type=float, default=None, help="dialogue stage lr (config's: 1e-3)")
    p.add_argument("--batch", type=int, default=None, help="dialogue stage batch (config's: 16)")
    p.add_argument("--dropout", type=float, default=None, help="Q-Former dropout (0.1)")
    p.add_argument("--train_kinds", default=None,
                   help="dialogue stage on these kinds only, e.g. vision")  # fmt: skip
    p.add_argument("--caption_mix", type=int, default=0,
                   help="dialogue stage: add every train caption record N times")  # fmt: skip
    p.add_argument(
        "--seeds",
        default="0",
        help="the BLIP-2 runs' seeds, e.g. 0,1,2 (seed s > 0: run directories end "
        "in _seed<s>); with several, a summary over seeds",
    )
    p.add_argument("--splits", default="test",
                   help="the multi-seed summary's evaluation splits, e.g. test,val")  # fmt: skip
    p.add_argument("--instruct", action="store_true",
                   help="instruction-aware queries (InstructBLIP) in both stages")  # fmt: skip
    p.add_argument("--tag", default="", help="suffix of the BLIP-2 runs' directories")
    p.add_argument("--out", default=None, help="also write the tables into this markdown file")
    p.add_argument("--probe", action="store_true")
    args = p.parse_args(argv)
    from absl import logging

    from tiktalk_jax import input_pipeline, sample

    logging.set_verbosity(logging.WARNING)
    start = time.perf_counter()
    data_dir, kinds = prepare(args.workdir)
    captions = os.path.join(os.path.dirname(kinds), sample.CAPTIONS_FILE)
    if not os.path.isfile(captions):  # a workdir prepared before the sample had captions
        with tempfile.TemporaryDirectory() as tmp:
            sample.write_sample(tmp, seed=0)
            os.replace(os.path.join(tmp, sample.CAPTIONS_FILE), captions)
    vit_dir = extract_vit(data_dir)
    print(f"data ready {time.perf_counter() - start:.0f} s", flush=True)
    runs = os.path.join(args.workdir, "runs")
    reading = args.llm == "reading"
    llm_tag = "_reading" if reading else ""  # in every BLIP-2 run's directory name
    llm_steps = args.llm_steps or (READING_STEPS if reading else LLM_STEPS)
    llm_run = os.path.join(runs, "llm_reading" if reading else "llm_text")
    config = llm_config(data_dir, kinds, llm_steps, size="small" if reading else "tiny")
    copies = None
    if reading:
        src = input_pipeline.open_split(input_pipeline.dataset_dir(data_dir), "train")
        copies = caption_copies([dict(src[i]) for i in range(len(src))], video_attributes())
        print(f"  {len(copies)} counterfactual caption copies, e.g. {copies[0]['title']}")
    scores = {"LLM (text)": run(config, llm_run, extra_train=copies)}
    dirs = {"LLM (text)": llm_run}
    caption_dirs = {}
    seeds = [int(x) for x in args.seeds.split(",")]
    by_seed: dict[str, dict[int, str]] = {}  # variant -> seed -> dialogue run
    for seed in seeds:
        suffix = f"_seed{seed}" if seed else ""  # seed 0: the config's, no suffix
        settings = dict(lr=args.lr, batch=args.batch, dropout=args.dropout,
                        caption_mix=args.caption_mix or None, mix_captions=captions,
                        seed=seed or None, instruct=args.instruct or None)  # fmt: skip
        for variant in args.variants.split(","):
            qformer_run = None
            if args.caption_steps:
                tail = llm_tag + suffix + ("_instruct" if args.instruct else "")
                qformer_run = os.path.join(
                    runs, f"blip2_{variant}_caption{args.caption_steps}{tail}"
                )
                caption = blip2_config(variant, data_dir, kinds, llm_run, args.caption_steps,
                                       captions=captions, seed=seed or None,
                                       instruct=args.instruct)  # fmt: skip
                run(caption, qformer_run)
            config = blip2_config(variant, data_dir, kinds, llm_run, args.steps,
                                  qformer_run=qformer_run, **settings)  # fmt: skip
            cap = "_cap" if qformer_run else ""
            run_dir = os.path.join(runs, f"blip2_{variant}{cap}{args.tag}{llm_tag}{suffix}")
            score = run(config, run_dir, args.train_kinds)
            by_seed.setdefault(variant, {})[seed] = run_dir
            if seed == seeds[0]:  # the single-seed tables below: the first seed's runs
                name = f"BLIP-2 {variant}" + (" (caption stage)" if qformer_run else "")
                dirs[name], scores[name] = run_dir, score
                if qformer_run:
                    caption_dirs[variant] = qformer_run
    text = table(scores)
    if reading:  # the point of the reading LLM: it names a colour written into its prompt
        read = {split: (colour_choice(llm_run, split, caption_title=True),
                        colour_choice(llm_run, split)) for split in ("test", "val")}  # fmt: skip
        text = (
            "The reading LLM names the colour (vision replies, by likelihood, chance 25%) with "
            "the true caption before the title / without: "
            + ", ".join(f"{k} {a} / {b}" for k, (a, b) in read.items())
            + "\n\n"
            + text
        )
    shown = {k: v for k, v in settings.items() if v is not None and k != "seed"}
    text = (
        f"LLM {args.llm} {llm_steps} steps, caption stage {args.caption_steps} steps, dialogue "
        f"stage {args.steps} steps {json.dumps({**shown, 'seeds': seeds})}"
        f"{' (tables of seed ' + str(seeds[0]) + ')' if len(seeds) > 1 else ''}"
        f"{' on ' + args.train_kinds + ' dialogues' if args.train_kinds else ''} "
        f"(training and evaluation {time.perf_counter() - start:.0f} s; runs already in "
        f"--workdir are reused)\n\n{text}\n"
    )
    text += "\nColour chosen right on the vision dialogues (reference with each colour word, by "
    text += "likelihood; chance 25%)\n\n| run | train | test | test without frames |\n"
    text += "|---|---|---|---|\n"
    for name, rd in dirs.items():
        blind = colour_choice(rd, "test", blind=True) if name != "LLM (text)" else "-"
        text += (
            f"| {name} | {colour_choice(rd, 'train')} | {colour_choice(rd, 'test')} | {blind} |\n"
        )
    text += "\nVision replies (n=14) with each dialogue's own video and with ANOTHER video's "
    text += "frames (`shuffled_video_scores`)\n\n| run | frames | " + " | ".join(METRICS.values())
    text += " |\n|---" * 1 + "|---" * (len(METRICS) + 1) + "|\n"
    for name, rd in dirs.items():
        if name == "LLM (text)":
            continue
        for label, s in (("own", scores[name]), ("another video", shuffled_video_scores(rd))):
            cells = " | ".join(f"{s['per_kind']['vision'][m]:.1f}" for m in METRICS)
            text += f"| {name} | {label} | {cells} |\n"
    if caption_dirs:
        text += "\nCaption stage: colour named right from the frames alone (caption prompt, "
        text += "no title or context; chance 25%)\n\n| variant | train | test | test without "
        text += "frames |\n|---|---|---|---|\n"
        for variant, rd in caption_dirs.items():
            found = [caption_colour_choice(rd, split) for split in ("train", "test")]
            blind = caption_colour_choice(rd, "test", blind=True)
            text += f"| {variant} | {found[0]} | {found[1]} | {blind} |\n"
    if args.probe:
        probes = feature_probes(vit_dir)
        text += "\nLinear probes on the tiny ViT's tokens (held-out videos correct)\n\n"
        text += "| tokens | colour | shape |\n|---|---|---|\n"
        text += "".join(f"| {k} | {v['colour']} | {v['shape']} |\n" for k, v in probes.items())
        for name, rd in dirs.items():
            if name != "LLM (text)":
                text += f"\n{name} prefix: " + json.dumps(prefix_probe(rd), ensure_ascii=False)
        oracle = soft_prompt_oracle(rd)
        text += "\n\nFree per-colour prefix through the frozen LLM: " + json.dumps(oracle) + "\n"
    if len(seeds) > 1 or args.splits != "test":
        splits = args.splits.split(",")
        measured = {v: {seed: seed_measurements(rd, splits) for seed, rd in rds.items()}
                    for v, rds in by_seed.items()}  # fmt: skip
        text += (
            f"\nOver seeds {args.seeds}, vision replies of {' + '.join(splits)} (a seed's "
            "value: the mean over the splits; mean ± standard deviation over seeds)\n\n"
        )
        text += seed_summary(seed_measurements(llm_run, splits, visual=False), measured) + "\n"
    with open(os.path.join(args.workdir, "blip2_vision.md"), "w", encoding="utf-8") as f:
        f.write(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
