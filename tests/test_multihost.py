"""Multi-process runs on this machine: 2 processes x 4 fake CPU devices (gloo collectives,
coordinator on 127.0.0.1), started through the real entry point
(`python -m tiktalk_jax.main --coordinator_address=... --num_processes=2 --process_id=I`),
against one process with 8 fake devices (this pytest process).

  * A tiny Maria (T) trains 6 steps on a data=4 x fsdp=2 mesh and checkpoints at 3 and 6: the
    losses of every step and the final parameters equal those of one process fed the same
    global batches (the two hosts' shards side by side).
  * The 2-process run, its step-6 checkpoint removed, resumes from step 3 and reproduces
    steps 4-6, then evaluates the test split with 2 processes: every dialogue scored once,
    the scores those of 1 process evaluating the same checkpoint.
  * One process resuming the 2-process checkpoint stops with DataStateMismatch (why and how to
    go on); with data_resume="restart" it restores the state and trains on.

Runtime: most of it is the start-up and compilation of each launch (2 launches of 2
processes); the model is 1 layer, 32 wide.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tiktalk_jax import checkpoint, evaluate, input_pipeline, sharding, train
from tiktalk_jax.models import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
# The tiny Maria of test_maria_e2e (1 layer, 32 wide), text only, cheap to decode and score.
OVERRIDES = {
    "model.bert.hidden_size": 32,
    "model.bert.num_hidden_layers": 1,
    "model.bert.num_attention_heads": 2,
    "model.bert.intermediate_size": 64,
    "mesh.data": 4,
    "mesh.fsdp": 2,
    "input.batch_size": 16,
    "input.eval_batch_size": 16,
    "optim.lr": 0.01,
    "optim.warmup_steps": 1,
    "total_steps": STEPS,
    "checkpoint_every": STEPS // 2,
    "log_every": 1,
    "decode.max_new_tokens": 6,
    "decode.greedy": True,  # beam search is tested elsewhere; greedy compiles faster
    "eval.skip_meteor": True,
    "eval.num_negatives": 9,
    "eval.at_end": False,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The bundled sample's dialogues (TFDS) and vocab: all a text-only Maria reads."""
    from tfds_builder import tiktalk
    from tiktalk_jax import sample
    from tiktalk_jax import tokenizer as tokenizer_lib

    root = tmp_path_factory.mktemp("multihost")
    raw, data_dir = str(root / "raw"), str(root / "data")
    sample.write_sample(raw, seed=0)
    tiktalk.build(raw, data_dir, "dialogues")
    version_dir = input_pipeline.dataset_dir(data_dir)
    texts = tokenizer_lib.dialogue_texts(input_pipeline.open_split(version_dir, "train"))
    vocab = tokenizer_lib.train_wordpiece_vocab(texts)
    tokenizer_lib.write_vocab(vocab, os.path.join(version_dir, tokenizer_lib.VOCAB_FILENAME))
    return data_dir


def _config_arg(data_dir: str) -> str:
    return f"{REPO}/configs/maria.py:variant=t,size=tiny,data_dir={data_dir}"


def _config(data_dir: str, **extra):
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from configs import maria as maria_config

    config = maria_config.get_config(_config_arg(data_dir).split(":", 1)[1])
    for key, value in {**OVERRIDES, **extra}.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(data_dir: str, workdir: str, *, extra=None, num_processes=2, devices=4):
    """`python -m tiktalk_jax.main --mode=train` as `num_processes` processes of `devices`
    fake CPU devices each; returns their logs (asserting every process exited 0).

    The launches share a persistent compilation cache next to the data (the second launch
    reuses the train step the first compiled)."""
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **(extra or {})}.items()]
    port = _free_port()
    env = dict(
        os.environ,
        PYTHONPATH=REPO,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",  # CPU collectives across processes
        JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(data_dir), "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    procs, logs = [], []
    for i in range(num_processes):
        log = open(f"{workdir}.process{i}.log", "w+")
        cmd = [sys.executable, "-m", "tiktalk_jax.main", "--mode=train",
               f"--config={_config_arg(data_dir)}", f"--workdir={workdir}", *flags,
               f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
               f"--process_id={i}"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log))
        logs.append(log)
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    for i, (code, text) in enumerate(zip(codes, texts)):
        assert code == 0, f"process {i} exited {code}:\n{text[-4000:]}"
    return texts


class _TwoHosts:
    """The global batches of a 2-host run, in one process: host 0's shard then host 1's (the
    rows each process's devices hold on the data x fsdp mesh)."""

    def __init__(self, hosts):
        self.its = [iter(h) for h in hosts]

    def __iter__(self):
        return self

    def __next__(self):
        batches = [next(it) for it in self.its]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self):
        return [it.get_state() for it in self.its]

    def set_state(self, state):
        for it, s in zip(self.its, state):
            it.set_state(s)


def _two_host_datasets(config):
    family = registry.get(config.model.name)
    side = family.side_tables(config) if family.side_tables else None
    hosts = [
        input_pipeline.make_datasets(config, side_tables=side, process_index=i, process_count=2)
        for i in (0, 1)
    ]
    return dataclasses.replace(hosts[0], train=_TwoHosts([h.train for h in hosts]))


def _losses(workdir):
    return {s: m["train/loss"] for s, m in train.read_metrics(str(workdir)).items() if m}


def _saved_state(workdir, step):
    """The train state a checkpoint holds, as numpy arrays by path."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    saved = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
    tree = ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(restore_args=as_numpy)
    )
    return dict(sharding.leaves_with_paths(tree))


def _assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_allclose(a[path], b[path], rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The 1-process reference (same global batches) and the 2-process run, 6 steps each."""
    root = tmp_path_factory.mktemp("runs")
    reference = str(root / "one_process")
    config = _config(data)
    train.train_and_evaluate(config, reference, datasets=_two_host_datasets(config))
    two = str(root / "two_processes")
    logs = _launch(data, two)
    return config, reference, two, logs


def test_two_processes_train_like_one_process_on_the_same_global_batch(runs):
    config, reference, two, logs = runs
    assert "process 1 of 2: 4 local devices of 8 (cpu)" in logs[1]
    ref_losses, losses = _losses(reference), _losses(two)
    assert sorted(losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                               [ref_losses[s] for s in sorted(losses)], rtol=1e-5)  # fmt: skip
    assert losses[STEPS] < losses[1]
    # Checkpoints written collectively: one array store and one data state per process.
    for step in (STEPS // 2, STEPS):
        ckpt = os.path.join(two, "checkpoints", str(step))
        assert sorted(os.listdir(os.path.join(ckpt, "data")))[-2:] == [
            "process_0-of-2.json",
            "process_1-of-2.json",
        ]
        meta = json.load(open(os.path.join(ckpt, "meta", "metadata")))
        assert meta["data"] == {"global_batch_size": 16, "process_count": 2}
    _assert_states_equal(_saved_state(two, STEPS), _saved_state(reference, STEPS))
    # Only process 0 writes logs and the config.
    assert os.path.exists(os.path.join(two, "config.json"))
    assert "train/loss" in logs[0] and "train/loss" not in logs[1]


def test_the_two_process_run_resumes_and_evaluates_like_one_process(runs, data, tmp_path):
    config, reference, two, _ = runs
    resumed = str(tmp_path / "resumed")
    shutil.copytree(two, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(STEPS)))
    logs = _launch(data, resumed, extra={"eval.at_end": True})
    assert f"resumed from {resumed}/checkpoints/{STEPS // 2}" in logs[0]
    assert _losses(resumed) == _losses(two)  # steps 4-6 retrained, identical
    _assert_states_equal(_saved_state(resumed, STEPS), _saved_state(two, STEPS))

    # The 2-process evaluation of the final model: each test dialogue exactly once.
    two_scores = json.load(open(evaluate.scores_path(resumed, "test", STEPS), encoding="utf-8"))
    lines = open(evaluate.generations_path(resumed, "test", STEPS), encoding="utf-8").readlines()
    source = input_pipeline.open_split(input_pipeline.dataset_dir(data), "test")
    ids = sorted(json.loads(x)["dialogue_id"] for x in lines)
    assert ids == sorted(
        input_pipeline.as_text(source[i]["dialogue_id"]) for i in range(len(source))
    )
    assert two_scores["num_examples"] == len(source)
    # 1 process evaluating the same checkpoint gets the same scores.
    (one,) = evaluate.evaluate(evaluate.load_config(resumed), resumed, steps=STEPS)
    strip = lambda s: {k: v for k, v in s.items() if k != "metadata"}
    assert strip(one.scores) == strip(two_scores)


def test_one_process_resuming_a_two_process_checkpoint_stops_or_restarts_the_data(
    runs, tmp_path, caplog
):
    config, _, two, _ = runs
    workdir = str(tmp_path / "one_of_two")
    shutil.copytree(two, workdir)
    with pytest.raises(checkpoint.DataStateMismatch, match="process_count 2 -> 1") as e:
        train.train_and_evaluate(config, workdir)
    assert "--data_resume=restart" in str(e.value)
    # restart: the state is restored (onto 8 local devices), the iterators start afresh.
    result = train.train_and_evaluate(config, workdir, data_resume="restart")
    assert result.step == STEPS and "the data iterators start afresh" in caplog.text
    kernel = result.model.bert.layers[0].attention.query.kernel.value
    saved = _saved_state(two, STEPS)["params/bert/layers/0/attention/query/kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), saved)


def test_restore_onto_fewer_devices_continues_training(tmp_path):
    """A toy run checkpointed on 8 devices (data 4 x fsdp 2) resumes at step 10 in a process
    with 4 devices (data 2 x fsdp 2): Orbax reshards params and optimizer state onto the new
    mesh and the run continues with the same batches (same host count: exact data resume)."""
    import train_toy

    eight = tmp_path / "eight"
    config = train_toy.get_config()
    train.train_and_evaluate(config, str(eight), datasets=train_toy.datasets(config))
    four = tmp_path / "four"
    shutil.copytree(eight, four)
    for step in (15, 20):
        shutil.rmtree(four / "checkpoints" / str(step))
    env = dict(
        os.environ,
        PYTHONPATH=REPO,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )
    script = os.path.join(REPO, "tests", "train_toy.py")
    proc = subprocess.run(
        [sys.executable, script, str(four), "--config.mesh.data=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "FINISHED step=20 preempted=False" in proc.stdout
    ref, resumed = _losses(eight), _losses(four)
    assert sorted(resumed) == list(range(1, 21))
    # Other reduction orders over 4 devices: equal up to float rounding.
    np.testing.assert_allclose([resumed[s] for s in range(11, 21)],
                               [ref[s] for s in range(11, 21)], rtol=1e-4)  # fmt: skip
    _assert_states_equal(_saved_state(str(four), 20), _saved_state(str(eight), 20))
    # Another global batch size: the iterator position would mean other examples; stop.
    config.input.batch_size = 8
    with pytest.raises(checkpoint.DataStateMismatch, match="global_batch_size 16 -> 8"):
        train.train_and_evaluate(config, str(eight), datasets=train_toy.datasets(config))


def test_detect_reads_flags_env_slurm_and_tpu():
    from tiktalk_jax import distributed

    detect = distributed.detect
    assert detect(environ={}) is None and detect("off", environ={"SLURM_NTASKS": "2"}) is None
    flags = detect(coordinator_address="h:1", num_processes=2, process_id=1, environ={})
    assert flags == distributed.Setup("flags", "h:1", 2, 1, None)
    env = {"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
           "JAX_LOCAL_DEVICE_IDS": "0,1"}  # fmt: skip
    assert detect(environ=env) == distributed.Setup("env", "h:2", 4, 3, (0, 1))
    assert detect(environ={**env, "JAX_NUM_PROCESSES": "1"}) is None
    with pytest.raises(ValueError, match="missing \\['process_id'\\]"):
        detect(coordinator_address="h:1", num_processes=2, environ={})
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NTASKS": "16"}  # fmt: skip
    assert detect(environ=slurm).reason == "slurm"
    assert detect(environ={**slurm, "SLURM_NTASKS": "1"}) is None  # a one-task salloc
    per_node = detect(environ={**slurm, "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"})
    assert per_node == distributed.Setup("slurm", local_device_ids=(0, 1, 2, 3))
    assert detect(environ={"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}).reason == "tpu"
    assert detect(environ={"TPU_WORKER_HOSTNAMES": "w0"}) is None
    assert detect("on", environ={}).reason == "forced"


def test_data_shard_of_one_process_is_the_whole_batch():
    from tiktalk_jax import distributed

    for axes in (dict(data=4, fsdp=2, tensor=1), dict(data=1, fsdp=2, tensor=4)):
        assert distributed.data_shard(sharding.make_mesh(axes)) == (0, 1)
