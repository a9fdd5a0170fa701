"""The train loop end to end on a toy family, 8 fake devices as a data=4 x fsdp=2 mesh.

The SIGKILL / SIGTERM runs are real subprocesses (`tests/train_toy.py`) that signal themselves
when the pipeline formats a given batch, so the interruption lands at a known step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import train_toy
from flax import nnx

from tiktalk_jax import checkpoint, sharding, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FROZEN = "^encoder/"


def _config(**overrides):
    config = train_toy.get_config()
    config.frozen = FROZEN
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _run(config, workdir, source=None):
    return train.train_and_evaluate(
        config, str(workdir), datasets=train_toy.datasets(config, source)
    )


def _subprocess(workdir, *args):
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, os.path.join(REPO, "tests", "train_toy.py"), str(workdir), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _params(model):
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _losses(workdir):
    return {s: m["train/loss"] for s, m in train.read_metrics(str(workdir)).items() if m}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 20-step run with a frozen encoder, eval every 10 steps."""
    workdir = tmp_path_factory.mktemp("reference")
    result = _run(_config(eval_every=10), workdir)
    return workdir, result


def test_toy_model_trains_checkpoints_and_logs(reference):
    workdir, result = reference
    assert result.step == 20 and not result.preempted
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, 21))
    first, last = (
        np.mean([losses[s] for s in (1, 2, 3)]),
        np.mean([losses[s] for s in (16, 17, 18, 19, 20)]),
    )
    assert last < 0.5 * first, (first, last)
    metrics = train.read_metrics(str(workdir))
    assert {"train/mae", "train/grad_norm", "train/learning_rate"} <= set(metrics[20])
    assert "val/loss" in metrics[10] and "val/loss" in metrics[20]
    assert metrics[20]["val/loss"] < metrics[10]["val/loss"] * 1.5

    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["name"] == "toy" and config["frozen"] == FROZEN
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
    assert ckpt.all_steps() == [5, 10, 15, 20]
    ckpt.close()

    # Frozen params: untouched and never saved; trainable ones trained and sharded per the rules.
    fresh = train_toy.build(_config(), nnx.Rngs(0))
    final, initial = _params(result.model), _params(fresh)
    for path in [k for k in final if k[0] == "encoder"]:
        np.testing.assert_array_equal(final[path], initial[path])
    assert not np.allclose(final[("head", "kernel")], initial[("head", "kernel")])
    saved = ocp.StandardCheckpointer().metadata(workdir / "checkpoints" / "20" / "state")
    saved_paths = [p for p, _ in sharding.leaves_with_paths(saved.item_metadata.tree)]
    assert (
        "params/hidden/kernel" in saved_paths and "opt/opt_state/1/0/mu/head/kernel" in saved_paths
    )
    assert not [p for p in saved_paths if "encoder" in p]  # no frozen params, no moments
    assert "rest/stored_dropout/rngs/count" in saved_paths  # the model's own RNG stream
    assert result.model.encoder.kernel.value.sharding.spec == jax.P("fsdp")
    assert result.model.head.kernel.value.sharding.spec == jax.P(None, "fsdp")

    # The same command once more: nothing left to train, nothing rewritten.
    again = _run(_config(eval_every=10), workdir)
    assert again.step == 20 and _losses(workdir) == losses


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(reference, tmp_path):
    ref_dir, ref = reference
    workdir = tmp_path / "killed"
    # Dies (SIGKILL, no cleanup) while fetching the batch of step 14; checkpoints at 5, 10.
    proc = _subprocess(
        workdir, f"--config.frozen={FROZEN}", "--config.eval_every=10", "--signal=SIGKILL:14"
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    killed_losses = _losses(workdir)
    assert max(killed_losses) == 13
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
    resumed_from = ckpt.latest_step()
    ckpt.close()
    assert resumed_from in (5, 10)

    result = _run(_config(eval_every=10), workdir)  # the same command again
    assert result.step == 20
    ref_params, params = _params(ref.model), _params(result.model)
    assert ref_params.keys() == params.keys()
    for path in ref_params:
        np.testing.assert_array_equal(params[path], ref_params[path], err_msg=str(path))
    # Every step's loss, before the kill and after the resume, equals the uninterrupted run's.
    ref_losses = _losses(ref_dir)
    assert _losses(workdir) == ref_losses
    assert {s: ref_losses[s] for s in killed_losses} == killed_losses


def test_sigterm_saves_a_checkpoint_at_the_step_reached(tmp_path):
    workdir = tmp_path / "preempted"
    proc = _subprocess(workdir, "--config.checkpoint_every=100", "--signal=SIGTERM:8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FINISHED step=8 preempted=True" in proc.stdout
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
    assert ckpt.all_steps() == [8]
    ckpt.close()
    meta = json.loads((workdir / "checkpoints" / "8" / "meta" / "metadata").read_text())
    assert meta["step"] == 8


def test_non_finite_loss_stops_with_the_step_and_no_later_checkpoint(tmp_path):
    # Checkpoints every step, logs every 5: the check before the save at step 3 catches it.
    config = _config(checkpoint_every=1, log_every=5)
    # Poison one record of the 3rd batch (first epoch): step 3's loss becomes NaN.
    it = iter(train_toy.datasets(config).train)
    for _ in range(3):
        batch = next(it)
    source = train_toy.records()
    source[int(batch["record_index"][3])]["x"] = np.full(train_toy.D_IN, np.nan, np.float32)

    with pytest.raises(train.NonFiniteError, match=r"at step 3 \(loss=nan"):
        _run(config, tmp_path, source)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()


def test_changed_frozen_weights_are_detected_on_resume(tmp_path):
    _run(_config(total_steps=4, checkpoint_every=4, eval_every=0), tmp_path)
    changed = _config(total_steps=8, checkpoint_every=4, eval_every=0)
    changed.model.encoder_seed = 8
    with pytest.raises(checkpoint.FrozenWeightsChanged, match="toy-encoder-seed-7") as err:
        _run(changed, tmp_path)
    assert "toy-encoder-seed-8" in str(err.value)


def test_gradient_accumulation_in_the_loop_matches_whole_batches(tmp_path):
    common = dict(total_steps=3, checkpoint_every=100, eval_every=0)
    whole = _config(**common)
    whole.model.dropout = 0.0  # micro-batches draw other dropout masks than the whole batch
    micro = _config(**common)
    micro.model.dropout = 0.0
    micro.optim.grad_accum_steps = 2
    a = _params(_run(whole, tmp_path / "whole").model)
    b = _params(_run(micro, tmp_path / "micro").model)
    for path in a:
        np.testing.assert_allclose(b[path], a[path], rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_bfloat16_compute_keeps_float32_params(tmp_path):
    config = _config(total_steps=3, checkpoint_every=100, eval_every=0)
    config.model.dtype = "bfloat16"
    result = _run(config, tmp_path)
    assert np.isfinite(result.metrics["loss"])
    assert {v.dtype for v in _params(result.model).values()} == {np.dtype(np.float32)}


def test_config_args_parse_typed_and_reject_typos():
    from configs import common

    arg = common.parse_arg("variant=tv,size=tiny,debug", variant="t", size="base", debug=False)
    assert (arg.variant, arg.size, arg.debug) == ("tv", "tiny", True)
    assert common.parse_arg("steps=7", steps=100).steps == 7
    with pytest.raises(ValueError, match="unknown config argument 'sise'"):
        common.parse_arg("sise=tiny", size="base")
    base = common.get_config()
    assert base.mesh.to_dict() == {"data": -1, "fsdp": 1, "tensor": 1}
    assert base.optim.grad_accum_steps == 1 and base.frozen == ""
