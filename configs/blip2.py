r"""BLIP-2 on TikTalk: a Q-Former adapter to the frozen (text-fine-tuned) LLM; Img, Video, temporal.

    # features: EVA ViT-g tokens (add --frame_tokens=8 for the temporal variant)
    python -m tiktalk_jax.extract --encoder=vit_g --pretrained=/ckpt/blip2-opt-2.7b \
        --data_dir=DATA --storage_dtype=bfloat16 --frame_tokens=8
    python -m tiktalk_jax.main --config=configs/llm_text.py:size=qwen2.5-7b,data_dir=DATA,\
init_from=/ckpt/Qwen2.5-7B-Instruct,tokenizer=/ckpt/Qwen2.5-7B-Instruct --workdir=runs/llm_text
    python -m tiktalk_jax.main --config=configs/blip2.py:variant=video,size=qwen2.5-7b,\
data_dir=DATA,llm_run=runs/llm_text,tokenizer=/ckpt/Qwen2.5-7B-Instruct,\
qformer=/ckpt/blip2-opt-2.7b --workdir=runs/blip2_video
    python -m tiktalk_jax.main --mode=eval --workdir=runs/blip2_video [--eval_split=test]
    # optional first: BLIP-2's caption stage aligns the Q-Former to this LLM, then start from it
    python -m tiktalk_jax.main --config=configs/blip2.py:stage=caption,captions=CAPTIONS.json,\
variant=video,size=qwen2.5-7b,data_dir=DATA,llm_run=runs/llm_text,\
tokenizer=/ckpt/Qwen2.5-7B-Instruct,qformer=/ckpt/blip2-opt-2.7b --workdir=runs/blip2_caption
    ... configs/blip2.py:variant=video,...,qformer_run=runs/blip2_caption --workdir=runs/blip2_video
    # CPU smoke run on the bundled sample (tiny random-init ViT, Q-Former and LLM):
    python -m tiktalk_jax.extract --encoder=vit_g --data_dir=DATA --frame_tokens=4 \
        --model_config='{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4}'
    python -m tiktalk_jax.main --config=configs/llm_text.py:size=tiny,lora=false,data_dir=DATA \
        --workdir=/tmp/llm_tiny
    python -m tiktalk_jax.main --config=configs/blip2.py:stage=caption,variant=temporal,\
size=tiny,data_dir=DATA,llm_run=/tmp/llm_tiny,captions=RAW/sample_captions.json \
        --workdir=/tmp/blip2_caption
    python -m tiktalk_jax.main --config=configs/blip2.py:variant=temporal,size=tiny,\
data_dir=DATA,llm_run=/tmp/llm_tiny,qformer_run=/tmp/blip2_caption --workdir=/tmp/blip2_tiny

The config argument (comma-separated `key=value`):
  variant    img (one stored frame: BLIP-2_Img) | video (frames averaged: BLIP-2_Video) |
             temporal (F frames with learned frame positions; beyond the paper).
  size       the LLM: tiny | qwen2.5-0.5b | qwen2.5-7b | glm4-9b (`llm.SHAPES`, random init
             when `llm` is unset) and the settings below; tiny also makes the Q-Former tiny.
  data_dir   TFDS data dir holding tiktalk/dialogues.
  visual_dir the vit_g features dataset (default DATA_DIR/features/vit_g, the extract CLI's).
  visual_dim the features' width (ViT-g: 1408; tiny default 64, the smoke run's ViT).
  frames     temporal: frames per example F (default 8; tiny 4, the sample's 4 s videos at 1 fps).
  llm        local HF checkpoint of the LLM (random init of `size` when unset).
  llm_run    instead: the workdir of an `llm` family run (configs/llm_text.py) whose trained
             LLM (latest checkpoint, LoRA merged) BLIP-2 freezes, as the paper freezes
             ChatGLM-6B fine-tuned on TikTalk text; same data_dir / tokenizer as that run.
  tokenizer  that LLM's tokenizer directory (its chat template builds the prompts, llm_inputs);
             unset: a WordPiece vocab trained on the train split and the plain template.
  qformer    local HF BLIP-2 directory to take the Q-Former, queries (and, when its LLM has our
             width, the projection) from; unset: random init.
  stage      dialogue (default: train on the dialogues) | caption (BLIP-2's second
             pre-training stage on `captions`: the frozen LLM continues a caption of the video
             from the query prefix alone, no title or context; blip2_captions.py).
  captions   a JSON file {video_id: caption or [captions]} (the sample writes
             sample_captions.json). Caption stage: its records are the data (eval scores the
             captions of the eval splits' videos). Dialogue stage with caption_mix=N: every
             train caption record is added N times to the train dialogues.
  caption_mix see captions (default 0: dialogues only).
  qformer_run a workdir of a blip2 run (the caption stage) to start the Q-Former and the
             projection from; its frozen LLM must be this one (checked).
  instruct   true: instruction-aware queries (InstructBLIP): the prompt (title + context) also
             enters the Q-Former, so the queries fetch what the turn asks about; a qformer_run
             must have been trained with the same setting (checked).
  kinds_file a `sample_kinds.json`: eval adds per-kind scores (e.g. replies that need vision).
Every field is also overridable as --config.x=y.

The paper gives no BLIP-2 training recipe; these follow BLIP-2's second stage (the LLM frozen,
AdamW with weight decay 0.05, peak lr 1e-4, 2,000 warmup steps; decay linear here, cosine there)
with the `llm` baseline's data settings (prompt <= 224 tokens, response <= 32, global batch 32,
one epoch) so the two differ by the visual prefix only. The Q-Former trains in float32, the
frozen LLM is stored and run in bfloat16 and sharded over fsdp. Decoding: beam 5, at most 30
tokens (the original BLIP-2's).
"""

from __future__ import annotations

import ml_collections

from configs import common

TRAIN_DIALOGUES = 363_589  # the paper's train split
VISUAL_TOKENS = 257  # 224 px / patch 14 -> 16 x 16 patches + the class token
STAGES = ("dialogue", "caption")
# Caption stage on real data: BLIP-2 pre-trains for 250K steps on 129M images; aligning a
# pre-trained Q-Former to a new LLM needs far less. Set --config.total_steps for your captions.
CAPTION_STEPS = 10_000


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(
        arg,
        variant="video",
        size="tiny",
        data_dir=None,
        visual_dir=None,
        visual_dim=0,
        frames=0,
        llm=None,
        llm_run=None,
        tokenizer=None,
        qformer=None,
        stage="dialogue",
        captions=None,
        caption_mix=0,
        qformer_run=None,
        instruct=False,
        kinds_file=None,
    )
    from tiktalk_jax.models import blip2, blip2_captions, blip2_inputs, llm  # registers them

    if args.variant not in blip2.VARIANTS:
        raise ValueError(f"variant must be one of {blip2.VARIANTS}, got {args.variant!r}")
    if args.size not in llm.SHAPES:
        raise ValueError(f"size must be one of {sorted(llm.SHAPES)}, got {args.size!r}")
    if args.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {args.stage!r}")
    caption = args.stage == "caption"
    if args.captions and not caption and not int(args.caption_mix):
        raise ValueError("captions= in the dialogue stage needs caption_mix=N (N >= 1)")
    if caption and not args.captions:
        raise ValueError("stage=caption needs captions=<a JSON file {video_id: [captions]}>")
    tiny = args.size == "tiny"

    config = common.base_config()
    config.model = blip2.model_config(variant=args.variant)
    config.model.llm = llm.model_config(
        shape=args.size,
        dtype="float32" if tiny else "bfloat16",
        param_dtype="float32" if tiny else "bfloat16",  # frozen: stored in the compute dtype
        remat=not tiny,
        lora=dict(rank=0),
    )
    config.model.llm.init_from = common.optional_str(args.llm)
    config.model.llm_run = common.optional_str(args.llm_run)
    config.model.qformer.init_from = common.optional_str(args.qformer)
    config.model.qformer_run = common.optional_str(args.qformer_run)
    config.model.qformer.instruction = bool(args.instruct)
    if tiny:
        config.model.qformer.update(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            num_query_tokens=8,
        )
    config.frozen = "^llm/"

    inp = config.input
    inp.data_dir = common.optional_str(args.data_dir)
    inp.tokenizer = common.optional_str(args.tokenizer)
    inp.visual_dir = common.optional_str(args.visual_dir)
    inp.visual_field = blip2_inputs.VARIANT_FIELDS[args.variant]
    inp.visual_tokens = VISUAL_TOKENS
    inp.visual_dim = int(args.visual_dim) or (64 if tiny else 1408)
    temporal = args.variant == "temporal"
    inp.visual_frames = (int(args.frames) or (4 if tiny else 8)) if temporal else 1
    inp.visual_dtype = "float32" if tiny else "bfloat16"
    inp.train_split = "train"
    inp.eval_splits = ("val",)
    inp.max_title_len = 16 if tiny else 32
    inp.max_context_len = 64 if tiny else 224
    inp.max_response_len = 24 if tiny else 32
    inp.num_references = 5
    inp.batch_size = 16 if tiny else 32
    inp.eval_batch_size = 16 if tiny else 32
    if caption or int(args.caption_mix):
        if not args.captions:
            raise ValueError("caption_mix needs captions=<a JSON file {video_id: [captions]}>")
        inp.captions_file = args.captions
        inp.caption_prompt = blip2_captions.DEFAULT_PROMPT
        inp.caption_mix = 0 if caption else int(args.caption_mix)

    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    opt = config.optim
    if tiny and caption:
        # The 43 captioned train videos x 4 captions; measured on the sample: the Q-Former
        # names the colour of 10/10 test videos after 2,000 steps at 3e-3 (docs/blip2_vision.md).
        config.total_steps = 2000
        opt.lr, opt.warmup_steps = 3e-3, 50
    elif tiny:
        config.total_steps = 200
        opt.lr, opt.warmup_steps = 1e-3, 10
    elif caption:
        config.total_steps = CAPTION_STEPS
        opt.lr, opt.warmup_steps = 1e-4, 2000
    else:
        config.total_steps = TRAIN_DIALOGUES // inp.batch_size
        opt.lr, opt.warmup_steps = 1e-4, 2000
    opt.end_lr_fraction = 0.0
    opt.weight_decay = 0.05
    opt.clip_norm = 1.0
    config.log_every = 20 if tiny else 100
    config.checkpoint_every = 100 if tiny else 1000
    config.eval_every = 0 if tiny else 2000
    config.keep_checkpoints = 3

    config.decode = llm.decode_config()
    # Caption records are not dialogues: no reply kinds, and no retrieval (a video's captions
    # differ in number and a few videos give too few distinct negatives); BLEU / CIDEr remain.
    config.eval = common.eval_config(20 if tiny else 5, None if caption else args.kinds_file)
    if caption:
        config.eval.num_negatives = 0
    return config
