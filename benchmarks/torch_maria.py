"""PyTorch reference of Maria (T+V+A+K), for speed comparisons only (benchmarks/train_step.py,
benchmarks/decode_step.py). Not used by the project itself.

The same model as tiktalk_jax/models/maria.py, written the way the original Maria/OSCAR code is:
HF `BertModel`'s embeddings over the text `[response][context][knowledge]` (token types 0/1/2,
positions continuing after the response slot, knowledge right after the last real context
token), frame and audio features through Linear -> LayerNorm -> dropout (no position / type
embeddings), concatenated, then HF's `BertEncoder` with the UniLM seq2seq mask as a 4D boolean
mask `[B, 1, T, T]` (SDPA attention). The MLM head is HF's `BertOnlyMLMHead`, tied to the word
embeddings, applied to the gathered masked slots only. The state dict has `BertForMaskedLM`'s
layout (`bert.*`, `cls.predictions.*`) plus `frames.*` / `audio.*`, so `save_bert_checkpoint`
writes a directory `maria.load_bert_weights` reads (tests compare both forwards).

Training: MRP 70% of the response, MCP / MKP 15% of context / knowledge with BERT's 80/10/10,
the same per-segment counts and the same static number of masked slots as `maria.mask_tokens`;
AdamW (weight decay 0.05, biases and LayerNorm exempt; fused on CUDA), gradient clipping 1.0,
linear warmup, bf16 autocast (parameters float32). Runs eager or under `torch.compile` (the loss
and its backward; the optimizer step stays eager, fused on CUDA).

Decoding (`beam_search_recompute`): the original's recompute-every-step beam search: each step
runs the whole `[CLS] w1..wt [MASK] pad..][prefix]` sequence for every beam and reads the
logits at the [MASK]; beam scores are summed log-probabilities (no penalties: they cost nothing
next to the forward passes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
import torch
import transformers
from torch import nn
from torch.nn import functional as F

PAD, CLS, SEP, MASK = 0, 101, 102, 103  # bert-base-chinese ids (the JAX model's defaults)
RESPONSE_RATE, CONTEXT_RATE, KNOWLEDGE_RATE = 0.7, 0.15, 0.15
REPLACE_PROB, RANDOM_PROB = 0.8, 0.1


def bert_config(shape, dropout: float = 0.1) -> transformers.BertConfig:
    """HF config of `shape` (a `flops.MariaShape`): 3 token types, 512 positions, SDPA."""
    config = transformers.BertConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        type_vocab_size=3,
        max_position_embeddings=512,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    config._attn_implementation = "sdpa"
    return config


def num_to_mask(length: int, rate: float) -> int:
    """`maria.MariaConfig.num_to_mask` (no cap: the original's 300 never binds here)."""
    return max(round(rate * length), 1)


def segments(shape) -> list[tuple[str, int, float, bool]]:
    """(name, length, rate, exclude the first token) of the masked text segments."""
    return [
        ("response", shape.response, RESPONSE_RATE, True),
        ("context", shape.context, CONTEXT_RATE, False),
        ("knowledge", shape.knowledge, KNOWLEDGE_RATE, False),
    ]


def max_masked(shape) -> int:
    """Static masked slots per example (`maria.MariaConfig.max_masked`)."""
    return sum(
        max(min(num_to_mask(n, rate), n - int(skip)) for n in range(size + 1))
        for _, size, rate, skip in segments(shape)
    )


def seq2seq_mask(response_valid: torch.Tensor, prefix_valid: torch.Tensor) -> torch.Tensor:
    """UniLM mask over `[response][prefix]`: `bool[B, 1, T, T]` (True = may attend)."""
    tr = response_valid.shape[1]
    t = tr + prefix_valid.shape[1]
    device = response_valid.device
    idx = torch.arange(t, device=device)
    is_resp = idx < tr
    causal = idx[None, :] <= idx[:, None]
    allowed = torch.where(is_resp[:, None], ~is_resp[None, :] | causal, ~is_resp[None, :])
    key_valid = torch.cat([response_valid, prefix_valid], dim=1).bool()
    return (allowed[None] & key_valid[:, None, :])[:, None]


class TorchMaria(nn.Module):
    """BERT (HF modules) + feature embeddings + tied MLM head; `hidden(batch) -> [B, T, H]`."""

    def __init__(self, shape, dropout: float = 0.1):
        super().__init__()
        self.shape = shape
        self.config = bert_config(shape, dropout)
        h = shape.hidden
        self.bert = transformers.BertModel(self.config, add_pooling_layer=False)
        self.frames = self._media(shape.frame_dim, h, dropout)
        self.audio = self._media(shape.audio_dim, h, dropout)
        self.cls = transformers.models.bert.modeling_bert.BertOnlyMLMHead(self.config)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        for module in (self.frames, self.audio, self.cls):
            module.apply(self.bert._init_weights)

    def _media(self, dim: int, h: int, dropout: float) -> nn.Sequential:
        ln = nn.LayerNorm(h, eps=self.config.layer_norm_eps)
        return nn.Sequential(nn.Linear(dim, h), ln, nn.Dropout(dropout))

    def hidden(self, b: Mapping[str, torch.Tensor]) -> torch.Tensor:
        resp, ctx, know = b["response_ids"], b["context_ids"], b["knowledge_ids"]
        r, lc, lk = resp.shape[1], ctx.shape[1], know.shape[1]
        dev = resp.device
        ids = torch.cat([resp, ctx, know], dim=1)
        types = torch.cat(
            [torch.zeros_like(resp), torch.ones_like(ctx), torch.full_like(know, 2)], dim=1
        )
        context_len = b["context_mask"].sum(dim=1, keepdim=True)
        positions = torch.cat(
            [
                torch.arange(r, device=dev).expand(resp.shape[0], r),
                (r + torch.arange(lc, device=dev)).expand(resp.shape[0], lc),
                r + context_len + torch.arange(lk, device=dev),
            ],
            dim=1,
        )
        text = self.bert.embeddings(input_ids=ids, token_type_ids=types, position_ids=positions)
        x = torch.cat(
            [text, self.frames(b["frame_feats"]).to(text.dtype), self.audio(b["audio_feats"])],
            dim=1,
        )
        prefix_valid = torch.cat(
            [b["context_mask"], b["knowledge_mask"], b["frame_mask"], b["audio_mask"]], dim=1
        )
        mask = seq2seq_mask(b["response_mask"], prefix_valid)
        return self.bert.encoder(x, attention_mask=mask).last_hidden_state

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cls(hidden)


def mask_tokens(batch: Mapping[str, torch.Tensor], shape) -> tuple[dict, torch.Tensor, ...]:
    """`maria.mask_tokens` in torch: `(corrupted batch, positions, labels, weights [B, M])`."""
    segs = segments(shape)
    ids, cand, counts = [], [], []
    for name, size, rate, skip_first in segs:
        seg_ids, seg_valid = batch[f"{name}_ids"], batch[f"{name}_mask"].bool()
        pos = torch.arange(size, device=seg_ids.device)
        seg_cand = seg_valid & (pos >= int(skip_first))[None, :]
        table = torch.tensor([num_to_mask(n, rate) for n in range(size + 1)], device=seg_ids.device)
        n = table[seg_valid.sum(dim=1)]
        counts.append(torch.minimum(n, seg_cand.sum(dim=1)))
        ids.append(seg_ids)
        cand.append(seg_cand)
    sizes = [size for _, size, _, _ in segs]
    text, cand = torch.cat(ids, dim=1), torch.cat(cand, dim=1)
    dev = text.device
    seg = torch.repeat_interleave(
        torch.arange(len(segs), device=dev), torch.tensor(sizes, device=dev)
    )
    counts = torch.stack(counts, dim=1)
    score = torch.where(cand, seg[None, :] + torch.rand(text.shape, device=dev), len(segs) + 1.0)
    rank = torch.argsort(torch.argsort(score, dim=1), dim=1)
    per_seg = torch.stack([c.sum(dim=1) for c in torch.split(cand, sizes, dim=1)], dim=1)
    before = torch.cumsum(per_seg, dim=1) - per_seg
    sel = cand & (rank - before[:, seg] < counts[:, seg])
    u = torch.rand(text.shape, device=dev)
    random_ids = torch.randint(0, shape.vocab, text.shape, device=dev)
    replace = u < REPLACE_PROB
    rand = ~replace & (u < REPLACE_PROB + RANDOM_PROB)
    new = torch.where(sel & replace, MASK, torch.where(sel & rand, random_ids, text))
    out = dict(batch)
    for (name, _, _, _), part in zip(segs, torch.split(new, sizes, dim=1)):
        out[f"{name}_ids"] = part
    m = max_masked(shape)
    slot = torch.where(sel, torch.cumsum(sel, dim=1) - 1, m)
    positions = torch.zeros(text.shape[0], m + 1, dtype=torch.long, device=dev)
    positions.scatter_(1, slot, torch.arange(text.shape[1], device=dev).expand_as(slot))
    positions = positions[:, :m]
    weights = (torch.arange(m, device=dev)[None, :] < sel.sum(dim=1, keepdim=True)).float()
    labels = torch.gather(text, 1, positions)
    return out, positions, labels, weights


def loss_fn(model: TorchMaria, batch: Mapping[str, torch.Tensor], dtype: torch.dtype | None):
    """Masked-token cross-entropy over every masked slot of the batch (autocast to `dtype`)."""
    inputs, positions, labels, weights = mask_tokens(batch, model.shape)
    with torch.autocast(positions.device.type, dtype=dtype, enabled=dtype is not None):
        hidden = model.hidden(inputs)
        h = torch.gather(hidden, 1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = model.mlm_logits(h)
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return (ce * weights.flatten()).sum() / weights.sum().clamp(min=1.0)


def make_optimizer(model: nn.Module, lr: float = 3e-5, warmup: int = 100, decay: float = 0.05):
    """AdamW (biases / LayerNorm without decay; fused on CUDA) and a linear-warmup schedule."""
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n
                or n.startswith(("frames.1", "audio.1"))]  # fmt: skip
    ids = {id(p) for p in no_decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    fused = next(model.parameters()).is_cuda
    opt = torch.optim.AdamW(
        [dict(params=rest, weight_decay=decay), dict(params=no_decay, weight_decay=0.0)],
        lr=lr,
        fused=fused,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
    return opt, sched


class TrainStep:
    """One optimizer update per call: loss, backward, clip 1.0, AdamW, schedule.

    `compile=True` wraps the loss (forward, masking) in `torch.compile`; its backward is
    compiled by AOTAutograd with it.
    """

    def __init__(self, model: TorchMaria, dtype: torch.dtype | None, compile: bool = False):
        self.model, self.dtype = model, dtype
        self.opt, self.sched = make_optimizer(model)
        self.loss = torch.compile(loss_fn) if compile else loss_fn

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        loss = self.loss(self.model, batch, self.dtype)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def to_torch(batch: Mapping[str, np.ndarray], device: str | torch.device) -> dict:
    """numpy batch -> torch tensors (ids int64, masks bool, features float32) on `device`."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.dtype == bool:
            t = torch.from_numpy(v)
        elif np.issubdtype(v.dtype, np.integer):
            t = torch.from_numpy(v.astype(np.int64))
        else:
            t = torch.from_numpy(v.astype(np.float32))
        out[k] = t.to(device)
    return out


@torch.no_grad()
def beam_search_recompute(
    model: TorchMaria,
    batch: Mapping[str, torch.Tensor],
    beams: int,
    steps: int,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """The original's decoding: every step re-encodes the whole sequence for every beam.

    `batch` holds the prefix fields `[B, ...]`; returns `int64[B, beams, steps]` tokens. End
    tokens are not special (every run decodes exactly `steps` tokens, as maria_decode.py).
    """
    prefix = {k: v for k, v in batch.items() if not k.startswith("response")}
    b = prefix["context_ids"].shape[0]
    dev = prefix["context_ids"].device
    rows = {k: v.repeat_interleave(beams, dim=0) for k, v in prefix.items()}
    r = model.shape.response
    n = b * beams
    ids = torch.full((n, r), PAD, dtype=torch.long, device=dev)
    ids[:, 0] = CLS
    scores = torch.zeros(b, beams, device=dev)
    scores[:, 1:] = -1e9  # all beams start identical: expand the first only
    arange_r = torch.arange(r, device=dev)
    for t in range(1, steps + 1):
        step_ids = torch.where(arange_r[None] == t, MASK, ids)
        inputs = {**rows, "response_ids": step_ids, "response_mask": arange_r[None] <= t}
        inputs["response_mask"] = inputs["response_mask"].expand(n, r)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            hidden = model.hidden(inputs)
            logits = model.mlm_logits(hidden[:, t])
        logp = torch.log_softmax(logits.float(), dim=-1).view(b, beams, -1)
        total = (scores[..., None] + logp).view(b, -1)
        scores, flat = torch.topk(total, beams, dim=1)
        parent = flat // logp.shape[-1]
        word = flat % logp.shape[-1]
        rows_idx = (torch.arange(b, device=dev)[:, None] * beams + parent).flatten()
        ids = ids[rows_idx]
        ids[:, t] = word.flatten()
    return ids[:, 1 : steps + 1].view(b, beams, steps)


def save_bert_checkpoint(model: TorchMaria, directory: str) -> None:
    """`bert.*` and `cls.predictions.*` as a `BertForMaskedLM`-style HF directory
    (config.json + pytorch_model.bin), for `maria.load_bert_weights`."""
    os.makedirs(directory, exist_ok=True)
    state = {
        k: v.detach().cpu().clone()
        for k, v in model.state_dict().items()
        if k.startswith(("bert.", "cls.")) and k != "cls.predictions.decoder.weight"
    }
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    config = model.config.to_dict()
    config["architectures"] = ["BertForMaskedLM"]
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)


def media_weights(model: TorchMaria) -> dict[str, dict[str, np.ndarray]]:
    """Frame / audio projections as `{"frames"|"audio": {kernel [in, H], bias, scale, ln_bias}}`."""
    out = {}
    for name in ("frames", "audio"):
        linear, ln = getattr(model, name)[0], getattr(model, name)[1]
        out[name] = dict(
            kernel=linear.weight.detach().cpu().numpy().T,
            bias=linear.bias.detach().cpu().numpy(),
            scale=ln.weight.detach().cpu().numpy(),
            ln_bias=ln.bias.detach().cpu().numpy(),
        )
    return out
