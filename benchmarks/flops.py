"""Shapes and FLOP counts shared by the train-step and decoding benchmarks (no framework imports).

MFU = model FLOPs per step / step time / the device's peak FLOP/s. "Model FLOPs" count the
matrix multiplications the model needs (the usual convention, as in PaLM's MFU): embedding
lookups, LayerNorm, softmax, masking, the optimizer update and any activation recomputation
(remat) are NOT counted. A multiply-add is 2 FLOPs.

Maria (UniLM over BERT), per example, T = R + Lc + Lk + F + A tokens (40 + 100 + 40 + 50 + 50 =
280 at the paper's lengths), L layers of width H and MLP width I, M masked slots, vocab V:

    forward = L * (2 T (4 H^2 + 2 H I)          # Q, K, V, O and the two MLP matmuls
                   + 4 T^2 H)                    # Q K^T and P V over the full T x T mask
              + 2 F Dv H + 2 A Da H              # frame / audio feature projections
              + 2 M (H^2 + H V)                  # MLM head (transform + tied decoder), masked
                                                 # slots only (both implementations gather)
    train   = 3 * forward                        # backward = 2 x forward (grads of inputs and
                                                 # of weights)

The mask is not exploited (both implementations compute the full T x T scores), so the
attention term counts the full square.

BLIP-2 (Q-Former adapter + frozen decoder LLM), per example, Q queries, N visual tokens per frame,
F frames, Dv visual width, Hq / Iq / Lq the Q-Former's width / MLP width / layers (cross-attention
every c-th layer), and the LLM over S = Q + Lc + Lr tokens (width D, MLP width Il, Ll layers,
Q / K,V widths Dq = heads * head_dim, Dkv = kv_heads * head_dim, vocab V, head on the Lr
response slots):

    qformer forward = Lq * (2 Q (4 Hq^2 + 2 Hq Iq) + 4 Q^2 Hq)
                      + Lq / c * (2 Q 2 Hq^2 + 2 (F N) 2 Dv Hq + 4 Q (F N) Hq)   # cross-attention
                      + 2 Q Hq D                                                  # projection

With instruction-aware queries (`instruct=true`: the Lc prompt tokens join the self-attention,
U = Q + Lc) the self-attention terms count U tokens, the text FFN Lc tokens in every layer but
the last (its output feeds nothing the queries read; XLA drops it), and the instruction
projection 2 Lc D Hq is added:

    qformer forward = Lq * (8 U Hq^2 + 4 U^2 Hq) + 4 Hq Iq (Lq Q + (Lq - 1) Lc)
                      + (cross-attention and projection as above) + 2 Lc D Hq
    llm forward     = Ll * (2 S (2 D Dq + 2 D Dkv + 3 D Il) + 4 S^2 Dq) + 2 Lr D V
    train           = 3 * qformer forward                # trainable: input and weight grads
                      + 2 * llm linear FLOPs             # frozen: forward + input grads only
                      + 3 * llm attention FLOPs          # dQ, dK, dV, dP: 2 x the forward
"""

from __future__ import annotations

import dataclasses

# Dense bf16 peak FLOP/s per chip (vendor datasheets, no sparsity), matched as substrings of
# `jax.Device.device_kind` / `torch.cuda.get_device_name()`, first match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM
    ("H200", 989.4),
    ("A100", 312.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
    ("TPU v6", 918.0),
)


def peak_tflops(device_kind: str, dtype: str, override: float | None = None) -> float | None:
    """Peak TFLOP/s of one device: `override` when given, else the bf16 table entry matching
    `device_kind` (None for CPUs, unknown devices and non-bf16 compute: MFU is then n/a)."""
    if override:
        return float(override)
    if dtype != "bfloat16":
        return None
    for name, tflops in PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


def mfu(flops_per_step: float, step_seconds: float, peak: float | None, devices: int = 1):
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown."""
    if not peak or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak * 1e12 * devices)


# ---------------------------------------------------------------------------------------------
# Maria.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MariaShape:
    """BERT size and the T+V+A+K input lengths (the paper's: 180 text + 50 + 50 tokens)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    response: int = 40
    context: int = 100
    knowledge: int = 40
    frames: int = 50
    audio: int = 50
    frame_dim: int = 2048
    audio_dim: int = 128

    @property
    def tokens(self) -> int:
        return self.response + self.context + self.knowledge + self.frames + self.audio


# base: bert-base-chinese (the paper's); small / tiny: CPU-sized (same lengths).
MARIA_SIZES = {
    "base": MariaShape(hidden=768, layers=12, heads=12, intermediate=3072, vocab=21128),
    "small": MariaShape(hidden=256, layers=4, heads=4, intermediate=1024, vocab=21128),
    "tiny": MariaShape(hidden=64, layers=2, heads=4, intermediate=128, vocab=1000),
}


def maria_forward_flops(s: MariaShape, masked: int) -> float:
    """Forward FLOPs of one example (module docstring); `masked`: the static masked slots M."""
    t, h = s.tokens, s.hidden
    encoder = s.layers * (2 * t * (4 * h * h + 2 * h * s.intermediate) + 4 * t * t * h)
    media = 2 * s.frames * s.frame_dim * h + 2 * s.audio * s.audio_dim * h
    head = 2 * masked * (h * h + h * s.vocab)
    return float(encoder + media + head)


def maria_train_flops(s: MariaShape, masked: int, batch: int) -> float:
    """FLOPs of one train step on `batch` examples."""
    return 3.0 * batch * maria_forward_flops(s, masked)


def maria_decode_flops(s: MariaShape, batch: int, beams: int, steps: int, cached: bool) -> float:
    """Model FLOPs of one beam search (prefix P = T - R; each step one vocab head per row).

    Recompute: every step runs the whole sequence (R response slots + P) for every beam row.
    Cached: the prefix once per example, then 2 tokens per row and step attending to the P prefix
    keys and at most `steps + 1` response keys.
    """
    h, i, v = s.hidden, s.intermediate, s.vocab
    p = s.tokens - s.response
    linear = lambda n: s.layers * 2 * n * (4 * h * h + 2 * h * i)
    head = 2 * (h * h + h * v)
    rows = batch * beams
    if not cached:
        t = s.tokens
        per_step = rows * (linear(t) + s.layers * 4 * t * t * h + head)
        media = 2 * s.frames * s.frame_dim * h + 2 * s.audio * s.audio_dim * h
        return float(steps * (per_step + rows * media))
    prefix = batch * (linear(p) + s.layers * 4 * p * p * h)
    prefix += batch * (2 * s.frames * s.frame_dim * h + 2 * s.audio * s.audio_dim * h)
    per_step = rows * (linear(2) + s.layers * 4 * 2 * (p + steps + 1) * h + head)
    return float(prefix + steps * per_step)


# ---------------------------------------------------------------------------------------------
# BLIP-2.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Blip2Shape:
    """Q-Former, visual tokens, LLM and text lengths of one BLIP-2 train example."""

    q_hidden: int
    q_layers: int
    q_intermediate: int
    queries: int
    cross_every: int
    visual_tokens: int
    visual_frames: int
    visual_dim: int
    llm_hidden: int
    llm_layers: int
    llm_intermediate: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    llm_vocab: int
    prompt: int
    response: int
    instruction: int = 0  # prompt tokens the Q-Former reads (instruct=true), else 0

    @property
    def llm_tokens(self) -> int:
        return self.queries + self.prompt + self.response


def blip2_flops(s: Blip2Shape) -> dict[str, float]:
    """Per-example forward FLOPs: `{"qformer", "llm_linear", "llm_attention"}`."""
    q, hq = s.queries, s.q_hidden
    n = s.visual_tokens * s.visual_frames
    cross_layers = s.q_layers // s.cross_every
    u, t_ins = q + s.instruction, s.instruction
    qformer = s.q_layers * (8 * u * hq * hq + 4 * u * u * hq)
    qformer += 4 * hq * s.q_intermediate * (s.q_layers * q + (s.q_layers - 1) * t_ins)
    qformer += 2 * t_ins * s.llm_hidden * hq
    qformer += cross_layers * (2 * q * 2 * hq * hq + 2 * n * 2 * s.visual_dim * hq + 4 * q * n * hq)
    qformer += 2 * q * hq * s.llm_hidden
    d, t = s.llm_hidden, s.llm_tokens
    dq, dkv = s.llm_heads * s.llm_head_dim, s.llm_kv_heads * s.llm_head_dim
    linear = s.llm_layers * 2 * t * (2 * d * dq + 2 * d * dkv + 3 * d * s.llm_intermediate)
    linear += 2 * s.response * d * s.llm_vocab
    attention = s.llm_layers * 4 * t * t * dq
    return dict(qformer=float(qformer), llm_linear=float(linear), llm_attention=float(attention))


def blip2_train_flops(s: Blip2Shape, batch: int) -> float:
    """FLOPs of one train step (trainable Q-Former, frozen LLM; module docstring)."""
    f = blip2_flops(s)
    return batch * (3 * f["qformer"] + 2 * f["llm_linear"] + 3 * f["llm_attention"])
