r"""The paper's fine-tuned ChatGLM-6B text baseline: a decoder LLM fine-tuned on TikTalk text.

    python -m tiktalk_jax.main --config=configs/llm_text.py:size=qwen2.5-7b,data_dir=DATA,\
init_from=/ckpt/Qwen2.5-7B-Instruct,tokenizer=/ckpt/Qwen2.5-7B-Instruct \
        --workdir=runs/llm_text [--config.mesh.tensor=2]
    python -m tiktalk_jax.main --mode=eval --workdir=runs/llm_text [--eval_split=test]
    # CPU smoke run on the bundled sample (random-init 2-layer decoder, trained vocabulary):
    python -m tiktalk_jax.main --config=configs/llm_text.py:size=tiny,data_dir=DATA \
        --workdir=/tmp/llm_tiny

The config argument (comma-separated `key=value`):
  size       tiny | small | qwen2.5-0.5b | qwen2.5-7b | glm4-9b (`llm.SHAPES`): the random-init
             shape and the training settings (tiny: CPU tests; small: tiny's settings at lr 3e-3,
             the CPU LLM that learns to read its prompt, benchmarks/blip2_vision.py
             --llm=reading; the others: the LLM settings below).
             With init_from the checkpoint's config.json gives the shape.
  lora       True (default): LoRA adapters on every block projection, the base frozen
             (`config.frozen = lora.frozen_regex()`); False: full fine-tuning (no adapters,
             nothing frozen, float32 master weights).
  rank, alpha  LoRA rank and scale numerator (alpha / rank).
  data_dir   TFDS data dir holding tiktalk/dialogues.
  tokenizer  the checkpoint's local HF tokenizer directory (tokenizer.json +
             tokenizer_config.json; its chat template builds the prompts, `llm_inputs`); unset:
             a WordPiece vocab trained on the train split and the plain template.
  init_from  local HF checkpoint directory (llama / qwen2 / qwen3 / glm), read sharded onto the
             mesh; unset: random init of `size`.
  kinds_file a `sample_kinds.json`: eval adds per-kind scores.
Every field is also overridable as --config.x=y.

The paper fine-tunes ChatGLM-6B on TikTalk text and gives no recipe; ChatGLM-6B itself (the
GLM-130B-style architecture) is not ported, GLM-4 and the Qwen / Llama decoders are. Settings
(sizes other than tiny / small): the chat prompt of at most 224 tokens (title <= 32, the latest
turns), response <= 32 tokens, global batch 32, bf16 compute, one epoch of the 363,589 train
dialogues; LoRA: rank 8, alpha 16, q/k/v/out/gate/up/down, lr 2e-4, no weight decay, frozen bf16
base, blocks rematerialised in the backward pass; full fine-tuning: lr 1e-5, weight decay 0.01.
Linear warmup (3% of the steps) then linear decay to 0, clipping 1.0. Decoding: beam 5, at most 30
tokens (the original BLIP-2's, whose LLM in the paper is this fine-tuned ChatGLM-6B). The
per-device memory of the 7B LoRA step on 8 devices is in docs/scaling.md
(benchmarks/llm_aot_memory.py).

Evaluation decodes hypotheses with the run's tokenizer (the family's `decode_text` hook,
`llm_inputs.decode_text`): up to the template's end token or eos, byte-level BPE decoded to
UTF-8 with special tokens skipped (WordPiece pieces joined without spaces for the trained
vocabulary); retrieval candidates are laid out exactly like the training responses
(`llm_inputs.encode_candidates`: `response end`). Special ids of any tokenizer come from
`tiktalk_jax.tokenizer.special_ids`.
"""

from __future__ import annotations

import ml_collections

from configs import common

TRAIN_DIALOGUES = 363_589  # the paper's train split


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(
        arg,
        size="tiny",
        lora=True,
        rank=8,
        alpha=16.0,
        data_dir=None,
        tokenizer=None,
        init_from=None,
        kinds_file=None,
    )
    from tiktalk_jax.models import llm, lora  # registers the family and the formatter

    if args.size not in llm.SHAPES:
        raise ValueError(f"size must be one of {sorted(llm.SHAPES)}, got {args.size!r}")
    # tiny and small are CPU sizes: the sample's short inputs, float32, small batches.
    cpu = args.size in ("tiny", "small")

    config = common.base_config()
    config.model = llm.model_config(
        shape=args.size,
        dtype="float32" if cpu else "bfloat16",
        # A frozen base is stored in the compute dtype; trained weights keep float32 masters.
        param_dtype="bfloat16" if args.lora and not cpu else "float32",
        remat=not cpu,
    )
    config.model.init_from = common.optional_str(args.init_from)
    config.model.lora.rank = int(args.rank) if args.lora else 0
    config.model.lora.alpha = float(args.alpha)
    config.frozen = lora.frozen_regex() if args.lora else ""

    inp = config.input
    inp.data_dir = common.optional_str(args.data_dir)
    inp.tokenizer = common.optional_str(args.tokenizer)
    inp.train_split = "train"
    inp.eval_splits = ("val",)
    inp.max_title_len = 16 if cpu else 32
    inp.max_context_len = 64 if cpu else 224
    inp.max_response_len = 24 if cpu else 32
    inp.num_references = 5
    inp.batch_size = 16 if cpu else 32
    inp.eval_batch_size = 16 if cpu else 32

    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    epoch = TRAIN_DIALOGUES // inp.batch_size
    opt = config.optim
    if cpu:
        config.total_steps = 200
        # small: the lr its sample runs were measured at (docs/blip2_vision.md).
        opt.lr, opt.warmup_steps = (1e-2 if args.size == "tiny" else 3e-3), 10
    else:
        config.total_steps = epoch
        opt.lr = 2e-4 if args.lora else 1e-5
        opt.warmup_steps = max(1, int(0.03 * config.total_steps))
    opt.end_lr_fraction = 0.0
    opt.weight_decay = 0.0 if args.lora else 0.01
    opt.clip_norm = 1.0
    config.log_every = 20 if cpu else 100
    config.checkpoint_every = 100 if cpu else 1000
    config.eval_every = 0 if cpu else 2000
    config.keep_checkpoints = 3

    config.decode = llm.decode_config()
    config.eval = common.eval_config(20 if cpu else 5, args.kinds_file)
    return config
