r"""The paper's Livebot row (Ma et al. 2019): a transformer trained from scratch on frames + text.

    python -m tiktalk_jax.extract --encoder=resnet18 --pretrained=/ckpt/resnet-18 --data_dir=DATA
    python -m tiktalk_jax.main --config=configs/livebot.py:size=base,data_dir=DATA \
        --workdir=runs/livebot
    python -m tiktalk_jax.main --mode=eval --workdir=runs/livebot [--eval_split=test]
    # CPU smoke run on the bundled sample (features of any frame encoder, e.g. the demo's):
    python -m tiktalk_jax.main --config=configs/livebot.py:size=tiny,data_dir=DATA,\
frames_dir=DATA/features/frames,frame_dim=64 --workdir=/tmp/livebot_tiny

The config argument (comma-separated `key=value`):
  size       base: the original's shape and training settings (below); tiny: a 2-layer model
             for CPU tests and the bundled sample.
  data_dir   TFDS data dir holding tiktalk/dialogues.
  frames_dir a features dataset of `python -m tiktalk_jax.extract` (default:
             DATA_DIR/features/resnet18, the extract CLI's own for --encoder=resnet18).
  frame_dim  its feature width (ResNet-18: 512; checked against the features' metadata.json);
             frames are projected to the model width when they differ.
  tokenizer  local HF tokenizer dir or vocab.txt; unset: a WordPiece vocab of at most 30,000
             tokens trained on the train split (the original's 30k word dictionary).
  kinds_file a `sample_kinds.json` (dialogue_id -> reply kind): eval adds per-kind scores.
Every field is also overridable as --config.x=y.

size=base follows lancopku/livebot's `codes/transformer.py` (models/livebot.py lists the
deviations): d 512, 8 heads, FFN 2048, 6 blocks per stack, dropout 0.1, the 5 frames spread over
the video (ResNet-18 512-d features), a context of 100 tokens (its 5 comments x 20), responses
of 20 tokens; Adam at a constant lr 3e-4 without weight decay or clipping, batch 64, 50 epochs
of the 363,589 train dialogues; greedy decoding of at most 20 tokens.

size=tiny: d 64, 4 heads, FFN 128, 2 blocks, 4 frames (the sample's 4 s videos at 1 fps),
context 32 + response 24 tokens, batch 32, lr 1e-3 after 50 warmup steps, 800 steps.
"""

from __future__ import annotations

import os

import ml_collections

from configs import common

TRAIN_DIALOGUES = 363_589  # the paper's train split
_SIZES = ("tiny", "base")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(
        arg,
        size="base",
        data_dir=None,
        frames_dir=None,
        frame_dim=512,
        tokenizer=None,
        kinds_file=None,
    )
    from tiktalk_jax.models import livebot, livebot_inputs  # registers family and formatter

    if args.size not in _SIZES:
        raise ValueError(f"size must be one of {_SIZES}, got {args.size!r}")
    tiny = args.size == "tiny"
    frames_dir = args.frames_dir
    if frames_dir is None and args.data_dir:
        frames_dir = os.path.join(args.data_dir, "features", "resnet18")

    config = common.base_config()
    config.model = livebot.model_config(
        d_model=64 if tiny else 512,
        num_heads=4 if tiny else 8,
        d_ff=128 if tiny else 2048,
        num_layers=2 if tiny else 6,
        frame_dim=int(args.frame_dim),
        max_frames=4 if tiny else 5,
        max_context_len=32 if tiny else 100,
        max_response_len=24 if tiny else 20,
    )
    config.model.frames_dir = common.optional_str(frames_dir)

    inp = config.input
    inp.data_dir = common.optional_str(args.data_dir)
    inp.tokenizer = common.optional_str(args.tokenizer)
    inp.vocab_size = 30_000  # the bound of a trained vocabulary, as the original's dictionary
    inp.train_split = "train"
    inp.eval_splits = ("val",)
    inp.update(livebot_inputs.input_overrides(config.model))
    inp.num_references = 5
    inp.batch_size = 32 if tiny else 64
    inp.eval_batch_size = 16 if tiny else 64

    opt = config.optim
    if tiny:
        config.total_steps = 800
        opt.lr, opt.warmup_steps = 1e-3, 50
    else:
        config.total_steps = 50 * (TRAIN_DIALOGUES // inp.batch_size)
        opt.lr, opt.warmup_steps = 3e-4, 0
    opt.end_lr_fraction = 1.0  # a constant lr after warmup, as the original's plain Adam
    opt.weight_decay = 0.0
    opt.clip_norm = 0.0
    config.log_every = 20 if tiny else 100
    config.checkpoint_every = 400 if tiny else 10_000
    config.eval_every = 0 if tiny else 10_000
    config.keep_checkpoints = 3

    config.decode = livebot.decode_config()
    config.eval = common.eval_config(20 if tiny else 10, args.kinds_file)
    return config
