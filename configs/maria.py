r"""Maria (UniLM over BERT) on TikTalk: the variants of the paper's Tables 3 and 7.

    python -m tiktalk_jax.main --config=configs/maria.py:variant=tvak,size=base,\
data_dir=DATA,tokenizer=/ckpt/bert-base-chinese,init_from=/ckpt/bert-base-chinese \
        --workdir=runs/maria_tvak
    python -m tiktalk_jax.main --mode=eval --workdir=runs/maria_tvak [--eval_split=test]

The config argument (comma-separated `key=value`):
  variant    t | ta | tk | tv | tva | tvk | tvak: text, + vision (frames), + audio, +
             knowledge. Table 3: Maria = tv, Maria+Audio = tva, Maria+C3KG = tvk; its ablations
             text / Audio+text / C3KG+text = t / ta / tk (benchmarks/table3.py). The variant
             sets the model flags AND the formatter's segment lengths (a disabled segment has
             length 0), so choose it here, not with --config.model.variant.
  size       base: the paper's settings (below); tiny: a 2-layer model for CPU tests and the demo.
  data_dir   TFDS data dir holding tiktalk/dialogues (built by tfds_builder/tiktalk).
  frames_dir, audio_dir   features datasets of `python -m tiktalk_jax.extract` (default:
             DATA_DIR/features/resnet101 and DATA_DIR/features/vggish, the extract CLI's own).
  knowledge_dir   `python -m tiktalk_jax.knowledge.prepare` output (default: its own default).
  frame_dim, audio_dim   feature widths (ResNet-101: 2048, VGGish: 128; checked against the
             features' metadata.json).
  tokenizer  local HF tokenizer dir or vocab.txt (bert-base-chinese); unset: a WordPiece vocab
             trained on the train split (tiktalk_jax/tokenizer.py).
  init_from  local HF BERT dir (bert-base-chinese) to initialise from; unset: random init.
  kinds_file a `sample_kinds.json` (dialogue_id -> reply kind): eval adds per-kind scores.
Every field is also overridable as --config.x=y.

size=base follows the paper and the original Maria code (../shared/reference.md): BERT-base,
AdamW (weight decay 0.05, biases and LayerNorm exempt), lr 3e-5 with linear warmup over one epoch
(the paper gives no warmup length) then linear decay to 0, gradient clipping 1.0, dropout 0.1,
batch 64, 20 epochs of the 363,589 train dialogues, 180 text tokens (response 40 + context
100 + knowledge 40), 50 frames and 50 audio windows; decoding: beam 5, at most 20 tokens,
length penalty 0.3, repetition penalty 3.

size=tiny: hidden 128, 2 layers, lr 3e-3, 800 steps of 32; sized for the bundled sample (1082
train dialogues, 4 frames and 4 audio windows per video) on CPU (docs/ablation.md).
"""

from __future__ import annotations

import ml_collections

from configs import common

TRAIN_DIALOGUES = 363_589  # the paper's train split
_SIZES = ("tiny", "base")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(
        arg,
        variant="tvak",
        size="base",
        data_dir=None,
        frames_dir=None,
        audio_dir=None,
        knowledge_dir=None,
        frame_dim=2048,
        audio_dim=128,
        tokenizer=None,
        init_from=None,
        kinds_file=None,
    )
    from tiktalk_jax.models import maria  # the variant table; registers the family

    vision, audio, knowledge = maria.variant_flags(args.variant)
    if args.size not in _SIZES:
        raise ValueError(f"size must be one of {_SIZES}, got {args.size!r}")
    tiny = args.size == "tiny"

    config = common.base_config()
    config.model.name = "maria"
    config.model.variant = args.variant
    config.model.init_from = common.optional_str(args.init_from)
    config.model.media_layer_norm = True
    config.model.media_position_embeddings = False
    # None: from the tokenizer (vocab_size) or the init_from checkpoint.
    config.model.bert = ml_collections.ConfigDict(
        dict(
            vocab_size=ml_collections.config_dict.placeholder(int),
            hidden_size=128 if tiny else 768,
            num_hidden_layers=2 if tiny else 12,
            num_attention_heads=4 if tiny else 12,
            intermediate_size=256 if tiny else 3072,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            max_position_embeddings=128 if tiny else 512,
            type_vocab_size=3,
            initializer_range=0.02,
        )
    )

    inp = config.input
    inp.data_dir = common.optional_str(args.data_dir)
    inp.tokenizer = common.optional_str(args.tokenizer)
    inp.train_split = "train"
    inp.eval_splits = ("val",)
    inp.frames_dir = common.optional_str(args.frames_dir)
    inp.audio_dir = common.optional_str(args.audio_dir)
    inp.knowledge_dir = common.optional_str(args.knowledge_dir)
    inp.feature_norm = "standardize"  # see maria.StandardizedFeatures
    inp.frame_dim = args.frame_dim
    inp.audio_dim = args.audio_dim
    # tiny: the sample's turns are short and its 4 s videos give 4 frames and 4 audio windows.
    inp.max_response_len = 24 if tiny else 40
    inp.max_context_len = 32 if tiny else 100
    inp.max_knowledge_len = (16 if tiny else 40) if knowledge else 0
    inp.max_frames = (4 if tiny else 50) if vision else 0
    inp.max_audio = (4 if tiny else 50) if audio else 0
    inp.num_references = 5
    inp.batch_size = 32 if tiny else 64
    inp.eval_batch_size = 16 if tiny else 64

    epoch = TRAIN_DIALOGUES // inp.batch_size
    opt = config.optim
    if tiny:
        config.total_steps = 800
        opt.lr, opt.warmup_steps = 3e-3, 50
    else:
        config.total_steps = 20 * epoch
        opt.lr, opt.warmup_steps = 3e-5, epoch
    opt.end_lr_fraction = 0.0
    opt.weight_decay = 0.05
    opt.clip_norm = 1.0
    config.log_every = 20 if tiny else 100
    config.checkpoint_every = 400 if tiny else epoch
    config.eval_every = 0 if tiny else epoch
    config.keep_checkpoints = 3

    # Decoding of the original Maria (tiktalk_jax/decoding.py).
    config.decode = ml_collections.ConfigDict(
        dict(
            num_beams=5,
            max_new_tokens=20,
            length_penalty=0.3,
            repetition_penalty=3.0,
            greedy=False,
            cached=True,
        )
    )
    # Evaluation (tiktalk_jax/evaluate.py).
    config.eval = common.eval_config(20 if tiny else 10, args.kinds_file)
    return config
