"""Checkpointer: sharded round trip, keep-last-K, failed async saves, frozen fingerprints."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tiktalk_jax import checkpoint, sharding


@pytest.fixture
def mesh():
    return sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})


def _state(mesh, scale=1.0):
    kernel = jnp.arange(64, dtype=jnp.float32).reshape(8, 8) * scale
    return {
        "params": {
            "layers": {0: {"kernel": jax.device_put(kernel, NamedSharding(mesh, P("fsdp")))}},
            "bias": jnp.ones(3, jnp.bfloat16),
        },
        "rng": jax.random.key(7),
        "step": jnp.int32(12),
    }


def test_round_trip_onto_another_sharding_with_keys_data_state_and_meta(tmp_path, mesh):
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
    state = _state(mesh)
    ckpt.save(12, state, {"epoch": 1, "index": 5}, {"frozen": {"sha256": "abc"}})
    assert ckpt.latest_step() == 12
    assert json.loads((tmp_path / "12" / "data" / "process_0-of-1.json").read_text()) == {
        "epoch": 1,
        "index": 5,
    }
    # Restore onto a different layout (replicated kernel): Orbax reshards.
    target = jax.tree.map(lambda x: x, state)
    target["params"]["layers"][0]["kernel"] = jax.device_put(
        jnp.zeros((8, 8)), NamedSharding(mesh, P(None, "data"))
    )
    restored, data_state, meta = ckpt.restore(12, target)
    ckpt.close()
    kernel = restored["params"]["layers"][0]["kernel"]
    assert kernel.sharding.spec == P(None, "data")
    np.testing.assert_array_equal(np.asarray(kernel), np.arange(64).reshape(8, 8))
    assert restored["params"]["bias"].dtype == jnp.bfloat16
    assert (
        jax.random.key_data(restored["rng"]).tolist()
        == jax.random.key_data(jax.random.key(7)).tolist()
    )
    assert int(restored["step"]) == 12
    assert data_state == {"epoch": 1, "index": 5}
    assert meta == {"step": 12, "frozen": {"sha256": "abc"}}


def test_keeps_the_last_k_steps(tmp_path, mesh):
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3, 4):
        ckpt.save(step, _state(mesh, step), {"i": step}, {})
    ckpt.save(4, _state(mesh, 99), {"i": 99}, {})  # an existing step is not rewritten
    assert ckpt.all_steps() == [3, 4]
    restored, data_state, _ = ckpt.restore(4, _state(mesh))
    ckpt.close()
    assert data_state == {"i": 4}
    assert float(restored["params"]["layers"][0]["kernel"][0, 1]) == 4.0


def test_a_failed_async_save_raises_naming_the_step(tmp_path, mesh):
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
    ckpt.save(1, _state(mesh), {"ok": 1}, {})
    # The data state is serialised in the background: this save fails after save() returned.
    ckpt.save(2, _state(mesh), {"not json": object()}, {})
    with pytest.raises(checkpoint.CheckpointError, match="save of step 2 .* failed"):
        ckpt.wait()
    assert ckpt.all_steps() == [1]  # the broken step is not a checkpoint
    ckpt.save(3, _state(mesh), {"ok": 3}, {})
    ckpt.close()
    reopened = checkpoint.Checkpointer(str(tmp_path))
    assert reopened.all_steps() == [1, 3]
    reopened.close()


def test_the_next_save_also_surfaces_a_failure(tmp_path, mesh):
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
    ckpt.save(1, _state(mesh), {"bad": {1, 2}}, {})
    with pytest.raises(checkpoint.CheckpointError, match="step 1"):
        ckpt.save(2, _state(mesh), {}, {})
    ckpt.close()


def test_a_save_killed_before_commit_is_discarded_and_redone(tmp_path, mesh):
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(5, _state(mesh), {"i": 5}, {})
    ckpt.close()
    # What SIGKILL during an async save leaves: nested uncommitted temporary directories.
    partial = tmp_path / "10.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"
    partial.mkdir(parents=True)
    (partial / "d").write_text("half-written")
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5"]
    ckpt.save(10, _state(mesh), {"i": 10}, {})
    assert ckpt.all_steps() == [5, 10]
    ckpt.close()


def test_fingerprint_depends_on_content_not_layout(mesh):
    state = _state(mesh)["params"]
    host = jax.tree.map(np.asarray, state)
    a, b = checkpoint.fingerprint(state), checkpoint.fingerprint(host)
    assert a == b and a["num_arrays"] == 2 and a["num_params"] == 67
    changed = jax.tree.map(lambda x: x, host)
    changed["layers"][0]["kernel"] = changed["layers"][0]["kernel"].copy()
    changed["layers"][0]["kernel"][3, 3] += 1e-3
    assert checkpoint.fingerprint(changed)["sha256"] != a["sha256"]
    assert checkpoint.fingerprint({})["num_arrays"] == 0


def test_check_frozen_reports_both_sources_and_hashes(mesh):
    state = _state(mesh)["params"]
    recorded = checkpoint.frozen_record(state, "/weights/llm-v1")
    checkpoint.check_frozen(recorded, checkpoint.frozen_record(state, "/elsewhere"), "ckpt/5")
    checkpoint.check_frozen(None, checkpoint.frozen_record({}, None), "ckpt/5")
    now = checkpoint.frozen_record(_state(mesh, 2.0)["params"], "/weights/llm-v2")
    with pytest.raises(checkpoint.FrozenWeightsChanged) as err:
        checkpoint.check_frozen(recorded, now, "ckpt/5")
    message = str(err.value)
    assert "ckpt/5" in message and "/weights/llm-v1" in message and "/weights/llm-v2" in message
    assert recorded["sha256"] in message and now["sha256"] in message


def test_committed_steps_and_read_state_leave_another_runs_directory_as_it_is(tmp_path, mesh):
    """What a second run reads of a first run's checkpoints (BLIP-2's qformer_run): the
    committed steps, the named subtree, and nothing in the directory changed."""
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3, async_save=False)
    for step in (2, 5):
        ckpt.save(step, _state(mesh, step), {"i": step}, {"frozen": {"sha256": "x"}})
    ckpt.close()
    partial = tmp_path / "7.orbax-checkpoint-tmp-1"  # a save still in flight
    partial.mkdir()
    (tmp_path / "notes").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert checkpoint.committed_steps(str(tmp_path)) == ckpt.all_steps() == [2, 5]
    assert checkpoint.committed_steps(str(tmp_path / "missing")) == []
    target = {"params": {"layers": {0: {"kernel": jnp.zeros((8, 8))}}}}
    tree, meta = checkpoint.read_state(str(tmp_path), 5, target)
    np.testing.assert_array_equal(
        np.asarray(tree["params"]["layers"][0]["kernel"]), np.arange(64).reshape(8, 8) * 5
    )
    assert meta["frozen"] == {"sha256": "x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == before
