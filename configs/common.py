"""Shared defaults of every config, and the `get_config(arg)` argument parser.

A config file builds on `base_config()` and documents its command in its docstring, e.g.

    python -m tiktalk_jax.main --mode=train --config=configs/maria.py:variant=tvak,size=tiny \
        --workdir=/tmp/maria --config.total_steps=200

Every field can be overridden with `--config.<field>=<value>`; the resolved config is written to
`<workdir>/config.json`.

Fields (sections documented in their modules):
  seed               model init, dropout streams and data shuffling (config.input.seed).
  total_steps        optimizer updates to run.
  log_every          steps between train-metric summaries (metrics are fetched only then).
  checkpoint_every   steps between async checkpoints (one is always written at the end).
  keep_checkpoints   how many of the latest checkpoints to keep.
  async_checkpoints  write checkpoints in the background.
  eval_every         steps between eval-loss passes over config.input.eval_splits (0: never).
  frozen             regex(es) over parameter paths of frozen parameters ("" : none), e.g.
                     "^llm/": no gradients, no optimizer state, not re-saved in checkpoints.
  mesh               mesh axis sizes in order; one may be -1 (all remaining devices).
  sharding.rules     logical axis name -> mesh axis (tiktalk_jax/sharding.py).
  sharding.overrides (path regex, PartitionSpec tuple) pairs that win over the rules.
  optim              tiktalk_jax/optim.py.
  input              tiktalk_jax/input_pipeline.py.
  model.name         the model family (tiktalk_jax/models/registry.py); model.dtype is the
                     compute dtype ("bfloat16" for mixed precision), model.param_dtype the
                     storage dtype of parameters ("float32").
"""

from __future__ import annotations

import ml_collections

from tiktalk_jax import input_pipeline, optim, sharding


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """`"variant=tv,size=tiny"` -> ConfigDict, typed and completed by `defaults`.

    A bare word is a boolean flag set to True (`"debug"` -> debug=True). Unknown keys are an
    error, so a typo in the command line does not silently train the default.
    """
    parsed = ml_collections.ConfigDict(dict(defaults))
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            parsed[key] = True
        elif isinstance(default, bool):
            parsed[key] = value.lower() in ("1", "true", "yes")
        elif default is None:
            parsed[key] = value
        else:
            parsed[key] = type(default)(value)
    return parsed


def optional_str(value: str | None) -> ml_collections.FieldReference:
    """A string field that may be None and stays overridable with --config.x=..."""
    return ml_collections.FieldReference(value, field_type=str)


def eval_config(score_chunk: int, kinds_file: str | None) -> ml_collections.ConfigDict:
    """`config.eval` of every model: the paper's protocol on the test split (character-level
    scores, METEOR, 5 references among 100 retrieval candidates); `score_chunk` candidates are
    scored per pass (memory), `kinds_file` adds per-kind scores (`sample_kinds.json`)."""
    return ml_collections.ConfigDict(
        dict(
            split="test",
            at_end=True,  # the train mode evaluates the final model on eval.split
            tokenize="char",
            skip_meteor=False,
            num_negatives=95,
            retrieval_seed=0,
            score_chunk=score_chunk,
            kinds_file=optional_str(kinds_file),
        )
    )


def base_config() -> ml_collections.ConfigDict:
    """The defaults shared by every model config."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 10_000
    config.log_every = 50
    config.checkpoint_every = 1_000
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.eval_every = 0
    config.frozen = ""
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.sharding = ml_collections.ConfigDict(dict(rules=sharding.DEFAULT_RULES, overrides=()))
    config.optim = optim.default_config()
    config.input = input_pipeline.default_config()
    config.model = ml_collections.ConfigDict(
        dict(
            name=ml_collections.config_dict.placeholder(str),
            dtype="float32",
            param_dtype="float32",
        )
    )
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The bare defaults (no model): `--config=configs/common.py`."""
    del arg
    return base_config()
