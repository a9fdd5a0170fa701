r"""The paper's DialoGPT row: a Chinese GPT-2 chit-chat model fine-tuned on TikTalk text.

    python -m tiktalk_jax.main --config=configs/dialogpt.py:size=base,data_dir=DATA,\
init_from=/ckpt/gpt2-chitchat,tokenizer=/ckpt/gpt2-chitchat --workdir=runs/dialogpt
    python -m tiktalk_jax.main --mode=eval --workdir=runs/dialogpt [--eval_split=test]
    # CPU smoke run on the bundled sample (random-init 2-layer GPT-2, trained vocabulary):
    python -m tiktalk_jax.main --config=configs/dialogpt.py:size=tiny,data_dir=DATA \
        --workdir=/tmp/dialogpt_tiny

The config argument (comma-separated `key=value`):
  size       base: the GPT-2 shape and training settings below; tiny: a 2-layer model for CPU
             tests and the bundled sample.
  data_dir   TFDS data dir holding tiktalk/dialogues.
  tokenizer  the checkpoint's local vocabulary (a BERT-style vocab.txt or tokenizer directory);
             unset: a WordPiece vocab trained on the train split (tiktalk_jax/tokenizer.py).
  init_from  local HF GPT2LMHeadModel directory (the paper fine-tunes yangjianxin1/GPT2-chitchat);
             its config.json gives the shape; needs `tokenizer`. Unset: random init of `size`.
  kinds_file a `sample_kinds.json` (dialogue_id -> reply kind): eval adds per-kind scores.
Every field is also overridable as --config.x=y.

The formatter (models/gpt2_inputs.py) lays a dialogue out as GPT2-chitchat does,
`[CLS] turn_1 [SEP] ... turn_n [SEP] response [SEP]`; the loss is the response's tokens only
(GPT2-chitchat trains on every token of the dialogue). size=base follows GPT2-chitchat's
config.json and train.py (the paper gives no fine-tuning recipe): GPT-2 with 12 layers, 768
wide, 12 heads, 1024 positions, dropout 0.1; AdamW without weight decay, eps 1e-9, lr 2.6e-5,
4,000 warmup steps then linear decay to 0, clipping 2.0, batch 16 (its 4 x 4 accumulation
steps), inputs of at most 150 tokens (context 110 + response 40); 10 epochs of the 363,589
train dialogues (GPT2-chitchat runs up to 100 epochs with early stopping on its own corpus).
Decoding: `gpt2.decode_config()`, beam 5 without penalties, at most 20 tokens (GPT2-chitchat
samples top-8, which `tiktalk_jax.decoding` does not offer).

size=tiny: 128 wide, 2 layers, 4 heads, context 32 + response 24 tokens, batch 32, lr 3e-3 with
50 warmup steps, 800 steps (the tiny Maria's schedule, configs/maria.py).
"""

from __future__ import annotations

import ml_collections

from configs import common

TRAIN_DIALOGUES = 363_589  # the paper's train split
_SIZES = ("tiny", "base")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(
        arg, size="base", data_dir=None, tokenizer=None, init_from=None, kinds_file=None
    )
    from tiktalk_jax.models import gpt2  # registers the family and the formatter

    if args.size not in _SIZES:
        raise ValueError(f"size must be one of {_SIZES}, got {args.size!r}")
    tiny = args.size == "tiny"

    config = common.base_config()
    config.model = gpt2.model_config(
        n_embd=128 if tiny else 768,
        n_layer=2 if tiny else 12,
        n_head=4 if tiny else 12,
        n_positions=64 if tiny else 1024,
    )
    config.model.init_from = common.optional_str(args.init_from)

    inp = config.input
    inp.data_dir = common.optional_str(args.data_dir)
    inp.tokenizer = common.optional_str(args.tokenizer)
    inp.train_split = "train"
    inp.eval_splits = ("val",)
    inp.max_context_len = 32 if tiny else 110
    inp.max_response_len = 24 if tiny else 40
    inp.num_references = 5
    inp.batch_size = 32 if tiny else 16
    inp.eval_batch_size = 16 if tiny else 64

    opt = config.optim
    if tiny:
        config.total_steps = 800
        opt.lr, opt.warmup_steps = 3e-3, 50
    else:
        config.total_steps = 10 * (TRAIN_DIALOGUES // inp.batch_size)
        opt.lr, opt.warmup_steps = 2.6e-5, 4000
    opt.end_lr_fraction = 0.0
    opt.eps = 1e-9
    opt.weight_decay = 0.0
    opt.clip_norm = 2.0
    config.log_every = 20 if tiny else 100
    config.checkpoint_every = 400 if tiny else 10_000
    config.eval_every = 0 if tiny else 10_000
    config.keep_checkpoints = 3

    config.decode = gpt2.decode_config()
    config.eval = common.eval_config(20 if tiny else 10, args.kinds_file)
    return config
