r"""Export a trained Maria to a Hugging Face PyTorch directory.

    python -m tiktalk_jax.export --workdir=runs/maria_tvak --out=exported/maria_tvak \
        [--checkpoint_step=latest|N]

writes, in --out:

  config.json                    a `BertForMaskedLM` config (transformers reads it as is) plus a
                                 `maria` entry: variant, segment lengths, special token ids
  model.safetensors              the BERT trunk and MLM head under HF names
                                 (`bert.*`, `cls.predictions.*`; the decoder is tied to the word
                                 embeddings, as in bert-base-chinese)
  media_projections.safetensors  what turns features into tokens (torch layouts): per segment
                                 (`frames`, `audio`) `<seg>.proj.weight [H, D]`, `.proj.bias`,
                                 `.norm.weight/.bias` (LayerNorm), `.position.weight` (when
                                 learned), and the standardization the input pipeline applied,
                                 `<seg>.feature_mean [D]`, `<seg>.feature_std [D]`
  vocab.txt, tokenizer files     the run's tokenizer (`BertTokenizerFast.from_pretrained(out)`)
  README.md                      how the pieces fit together

The names come from `bert.hf_state_dict`, the inverse of the import mapping
(`bert.load_hf_weights`), so an export loads back into this project with `bert.from_pretrained`.
`BertForMaskedLM` alone computes Maria's text-only path (the T variant with a padding mask);
Maria's UniLM mask, response/context positions and the media tokens are described in the README.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MODEL_FILE = "model.safetensors"
PROJECTIONS_FILE = "media_projections.safetensors"
README_FILE = "README.md"


class ExportError(Exception):
    """A workdir that cannot be exported (no config, no checkpoint, another model family)."""


def hf_config(model_config: Any, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `config.json` of a `BertForMaskedLM` with Maria's shape (`model_config`: a
    `maria.MariaConfig`), with Maria's own settings under `maria`."""
    bert = dataclasses.asdict(model_config.bert)
    maria = {k: v for k, v in dataclasses.asdict(model_config).items() if k != "bert"}
    return {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "position_embedding_type": "absolute",
        **bert,
        "maria": {**maria, **(extra or {})},
    }


def projection_tensors(
    model: Any, feature_stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None
) -> dict[str, np.ndarray]:
    """Maria's feature embeddings as torch-layout float32 tensors (see the module docstring);
    `feature_stats`: segment -> (mean float[D], std float[D]) of the input standardization."""
    from tiktalk_jax.models import hf_import

    out = {}
    for name in ("frames", "audio"):
        seg = getattr(model, name)
        if seg is None:
            continue
        out.update(hf_import.linear_tensors(seg.proj, f"{name}.proj"))
        if seg.norm is not None:
            out.update(hf_import.layer_norm_tensors(seg.norm, f"{name}.norm"))
        if seg.position is not None:
            out[f"{name}.position.weight"] = np.asarray(seg.position.embedding.value, np.float32)
        if feature_stats and name in feature_stats:
            mean, std = feature_stats[name]
            out[f"{name}.feature_mean"] = np.asarray(mean, np.float32)
            out[f"{name}.feature_std"] = np.asarray(std, np.float32)
    return out


def _readme(config: Mapping[str, Any], projections: Sequence[str], source: str) -> str:
    m = config["maria"]
    segments = ", ".join(sorted({k.split(".")[0] for k in projections})) or "none (text only)"
    return f"""# Maria ({m.get("variant") or "?"}) exported from tiktalk_jax

Source: {source}

A UniLM-style Maria (TikTalk, Table 7): one BERT encoder (`BertForMaskedLM`, {config["hidden_size"]}
wide, {config["num_hidden_layers"]} layers, {config["vocab_size"]} tokens) over the sequence
`[response R][context Lc][knowledge Lk][frames F][audio A]`. Media segments here: {segments}.

```python
import torch, transformers
from safetensors.torch import load_file
model = transformers.BertForMaskedLM.from_pretrained(DIR).eval()
tokenizer = transformers.BertTokenizerFast.from_pretrained(DIR)
media = load_file(f"{{DIR}}/{PROJECTIONS_FILE}")   # empty for the text-only variant
```

Inputs (as `tiktalk_jax.models.maria` builds them; lengths R={m["max_response_len"]},
Lc={m["max_context_len"]}, Lk={m["max_knowledge_len"]} (used: {m["use_knowledge"]}),
F={m["max_frames"]} (used: {m["use_vision"]}), A={m["max_audio"]} (used: {m["use_audio"]})):
* response `[CLS] r [SEP]`: token type 0, positions 0..R-1;
* context `turn_1 [SEP] ... turn_n [SEP]` (latest turns kept): token type 1, positions R, R+1, ...;
* knowledge `tail;tail;... [SEP]`: token type {m["knowledge_segment"]}, positions continuing
  right after the last real context token;
* frames / audio: features standardized with `<seg>.feature_mean` / `<seg>.feature_std`, then
  `LayerNorm(Linear(x))` with `<seg>.proj.*`, `<seg>.norm.*` (no word, position or type
  embedding; pass them as `inputs_embeds`-style tokens after the text embeddings);
* attention (UniLM): response tokens see earlier response tokens and every valid prefix token;
  prefix tokens (context, knowledge, media) see each other, never the response.

Decoding: append `[MASK]` after the response so far and take the MLM prediction at it (beam 5,
length penalty 0.3, repetition penalty 3 in the paper's setup). Special ids: `[PAD]`
{m["pad_id"]}, `[CLS]` {m["cls_id"]}, `[SEP]` {m["sep_id"]}, `[MASK]` {m["mask_id"]}.
A text-only input with a padding mask is exactly `BertForMaskedLM`'s forward pass.
"""


def export_maria(
    model: Any,
    out_dir: str,
    *,
    tokenizer: Any = None,
    feature_stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    extra: Mapping[str, Any] | None = None,
    source: str = "an in-memory model",
) -> dict[str, str]:
    """Writes `model` (a `maria.Maria`) to `out_dir`; returns `{kind: path}` of what it wrote."""
    from safetensors.numpy import save_file

    from tiktalk_jax.models import bert as bert_lib

    os.makedirs(out_dir, exist_ok=True)
    config = hf_config(model.config, extra)
    files = {"config": os.path.join(out_dir, "config.json")}
    with open(files["config"], "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)
    files["model"] = os.path.join(out_dir, MODEL_FILE)
    save_file(bert_lib.hf_state_dict(model.bert), files["model"], metadata={"format": "pt"})
    projections = projection_tensors(model, feature_stats)
    files["projections"] = os.path.join(out_dir, PROJECTIONS_FILE)
    save_file(projections, files["projections"], metadata={"format": "pt"})
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out_dir)
        files["tokenizer"] = out_dir
    files["readme"] = os.path.join(out_dir, README_FILE)
    with open(files["readme"], "w", encoding="utf-8") as f:
        f.write(_readme(config, list(projections), source))
    return files


def _single_device_mesh(config: Any):
    """The config's mesh axes, all of size 1, on the first device: exporting (and responding)
    runs one example, and the checkpoint restores onto any mesh."""
    import jax

    from tiktalk_jax import sharding

    axes = {k: 1 for k in (config.get("mesh") or {"data": 1})}
    return sharding.make_mesh(axes, jax.devices()[:1])


def checkpoint_steps(workdir: str) -> list[int]:
    """The finished checkpoints of a run (as `evaluate.ModelLoader.steps`), without building it."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(n)
        for n in os.listdir(directory)
        if n.isdigit() and os.path.exists(os.path.join(directory, n, "_CHECKPOINT_METADATA"))
    )


def choose_step(workdir: str, step: str | int = "latest") -> int:
    """`step` ("latest" or a number) among the run's checkpoints; ExportError when absent."""
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ExportError(
            f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train there first "
            "(python -m tiktalk_jax.main --config=... --workdir=...)"
        )
    if str(step) == "latest":
        return steps[-1]
    if not str(step).isdigit() or int(step) not in steps:
        raise ExportError(f"no checkpoint {step} in {workdir}: available {steps}")
    return int(step)


def load_run_config(workdir: str) -> Any:
    """`<workdir>/config.json`; ExportError when the directory is not a training workdir."""
    from tiktalk_jax import evaluate

    try:
        return evaluate.load_config(workdir)
    except FileNotFoundError as e:
        raise ExportError(f"{workdir} is not a training workdir: {e}") from None


def restore_model(config: Any, workdir: str, step: int) -> Any:
    """The run's model with the parameters of checkpoint `step`, on one device, eval mode."""
    import jax

    from tiktalk_jax import evaluate

    mesh = _single_device_mesh(config)
    with jax.set_mesh(mesh):
        model = evaluate.ModelLoader(config, workdir, mesh).load(step)
    model.eval()
    return model


def run_feature_stats(config: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The standardization statistics the input pipeline applied to each feature segment of a
    Maria run (`maria.side_tables`); empty with `feature_norm = none` or no media segment."""
    from tiktalk_jax.models import maria, maria_inputs

    if config.input.get("feature_norm", "standardize") != "standardize":
        return {}
    vision, audio, _ = maria.variant_flags(config.model.variant)
    out = {}
    for table, used in ((maria_inputs.FRAMES, vision), (maria_inputs.AUDIO, audio)):
        if used:
            mean, std, _ = maria.feature_stats(
                maria.features_dir(config, table), config.input.train_split
            )
            out[table] = (mean, std)
    return out


def export_run(workdir: str, out_dir: str, step: str | int = "latest") -> dict[str, str]:
    """Exports checkpoint `step` of the Maria run in `workdir` to `out_dir`."""
    config = load_run_config(workdir)
    if config.model.name != "maria":
        raise ExportError(
            f"export writes Maria (BertForMaskedLM); {workdir} trained {config.model.name!r}"
        )
    chosen = choose_step(workdir, step)
    from tiktalk_jax.models import maria

    model = restore_model(config, workdir, chosen)
    extra = dict(variant=config.model.variant, checkpoint_step=chosen)
    return export_maria(
        model,
        out_dir,
        tokenizer=maria.family_tokenizer(config),
        feature_stats=run_feature_stats(config),
        extra=extra,
        source=f"{os.path.abspath(workdir)} checkpoint {chosen}",
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="the training run's workdir")
    p.add_argument("--out", required=True, help="directory to write the HF export into")
    p.add_argument("--checkpoint_step", default="latest", help="'latest' or a step number")
    args = p.parse_args(argv)
    try:
        files = export_run(args.workdir, args.out, args.checkpoint_step)
    except ExportError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    for kind, path in files.items():
        print(f"{kind:>12}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
