"""A damaged checkpoint is refused with one line naming what is wrong and the checkpoint to fall
back on, never restored as different numbers: flipped bytes (orbax does not notice: neo's
checksums do), a missing or truncated data file, a lost optimizer state. Checksums do not depend
on the mesh, and checkpoints written before neo kept them still load. A save that cannot be
written (a full disk) stops the run in one line, the previous checkpoint intact, the partial one
removed; a disk that cannot hold one checkpoint is refused before compiling."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo.checkpoint import Checkpointer, check_disk_space
from neo.checksum import checksums, checksums_of, mismatches
from neo.errors import NeoError

ROOT = Path(__file__).resolve().parent.parent


def state():
    k = jax.random.split(jax.random.key(0), 3)
    params = {"wte": jax.random.normal(k[0], (512, 64)), "ln": {"scale": jnp.ones((64,), jnp.bfloat16)}}
    opt = {"mu": jax.tree.map(lambda x: x / 3, params), "count": jnp.int32(7)}  # (all-zero chunks are not written)
    return params, opt


def save(path: Path, steps=(2, 4)) -> tuple:
    params, opt = state()
    ckpt = Checkpointer(str(path), async_save=False)
    for step in steps:
        ckpt.save(step, params, opt, {"data": {"step": step}})
    ckpt.close()
    return params, opt


def restore(path: Path, step: int = 4):
    abstract = jax.tree.map(jax.ShapeDtypeStruct.from_array if hasattr(jax.ShapeDtypeStruct, "from_array")
                            else (lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)), state())
    return Checkpointer(str(path), async_save=False).restore(step, *abstract)


def data_files(item: Path) -> list[Path]:
    return [p for p in item.rglob("*") if p.is_file() and p.parent.name == "d" and p.stat().st_size > 1024]


def test_checksums_do_not_depend_on_the_mesh_and_see_one_changed_word():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    params, _ = state()
    assert len(jax.devices()) == 8  # tests/conftest.py
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    sharded = jax.device_put(params, {"wte": NamedSharding(mesh, PartitionSpec("x", "y")),
                                      "ln": {"scale": NamedSharding(mesh, PartitionSpec("y"))}})
    assert checksums(sharded) == checksums(jax.device_get(params))
    changed = {**params, "wte": params["wte"].at[300, 5].add(1e-6)}
    swapped = {**params, "wte": params["wte"][jnp.array([1, 0] + list(range(2, 512)))]}  # same words, moved
    words = np.asarray(params["wte"]).view(np.uint32).ravel().astype(np.uint64)  # the definition, in numpy
    expected = [int(words.sum() % 2**32), int((words * np.arange(1, words.size + 1, dtype=np.uint64)).sum() % 2**32)]
    assert checksums(sharded)["['wte']"] == [*expected, "float32"]
    recorded = {"params": checksums(params), "opt_state": checksums(changed)}
    assert mismatches(recorded, {"params": changed, "opt_state": changed}) == ["params['wte']"]
    assert mismatches(recorded, {"params": swapped, "opt_state": params}) == ["params['wte']", "opt_state['wte']"]
    assert mismatches(recorded, {"params": params}) == []
    # several trees in one program: each tree's own sums
    assert checksums_of({"params": params, "opt_state": changed, "none": None}) == recorded


def test_flipped_bytes_are_refused_not_restored(tmp_path):
    params, opt = save(tmp_path)
    got, got_opt, meta = restore(tmp_path)  # intact: equal, and the checksums stay out of the meta
    np.testing.assert_array_equal(got["wte"], params["wte"])
    assert meta == {"step": 4, "data": {"step": 4}}
    for f in data_files(tmp_path / "checkpoints" / "4" / "params"):
        raw = bytearray(f.read_bytes())
        for i in range(len(raw) // 4, len(raw), 4096):
            raw[i] ^= 0x10
        f.write_bytes(bytes(raw))
    with pytest.raises(NeoError, match=r"checkpoint .*/4 is damaged: 1 array\(s\) read back differ from what was "
                                       r"written \(params\['wte'\]; .* delete .*/4 to resume from checkpoint 2"):
        restore(tmp_path)


def test_missing_or_truncated_data_file_names_the_fallback(tmp_path):
    save(tmp_path)
    (biggest,) = sorted(data_files(tmp_path / "checkpoints" / "4" / "params"), key=lambda p: -p.stat().st_size)[:1]
    with open(biggest, "r+b") as f:
        f.truncate(100)
    with pytest.raises(NeoError, match=r"/4 is damaged: a file in it is missing or unreadable \(OUT_OF_RANGE.*"
                                       r"delete .*/4 to resume from checkpoint 2"):
        restore(tmp_path)
    for f in data_files(tmp_path / "checkpoints" / "2" / "opt_state"):
        f.unlink()
    with pytest.raises(NeoError, match=r"/2 is damaged: a file in it is missing or unreadable .*mu.wte.*/2 to "
                                       r"start from scratch \(no checkpoint precedes it\)"):
        restore(tmp_path, step=2)


def test_a_training_checkpoint_without_its_optimizer_state_is_refused(tmp_path):
    save(tmp_path)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    assert ckpt.has_opt_state(4)
    os.system(f"rm -r {tmp_path / 'checkpoints' / '4' / 'opt_state'}")
    with pytest.raises(NeoError, match=r"/4 is damaged: training wrote it with optimizer state, but its opt_state "
                                       r"folder is missing.*delete .*/4 to resume from checkpoint 2"):
        ckpt.has_opt_state(4)
    params, _ = state()  # an imported model's checkpoint: parameters only, rightly
    imported = Checkpointer(str(tmp_path / "imported"), async_save=False)
    imported.save(0, params, meta={"imported_from": "somewhere"})
    assert not imported.has_opt_state(0)


def test_checkpoints_without_checksums_still_load(tmp_path):
    """Written before neo recorded checksums: nothing to verify against, so restored as is."""
    params, _ = save(tmp_path)
    meta_file = tmp_path / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta.pop("checksums")
    meta_file.write_text(json.dumps(meta))
    got, _, _ = restore(tmp_path)
    np.testing.assert_array_equal(got["wte"], params["wte"])


def test_main_reports_a_damaged_checkpoint_in_one_line(tmp_path):
    """Through main.py: one line, exit status 2, none of orbax's closed-event-loop tracebacks."""
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "main.py"), "--model", "tiny", "--set", "train_steps=4",
           "--set", f"model_path={json.dumps(str(tmp_path))}", "--steps_per_checkpoint", "2"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    for f in data_files(tmp_path / "checkpoints" / "4" / "opt_state"):
        f.unlink()
    run = subprocess.run(cmd[:5] + ["train_steps=6"] + cmd[6:], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"neo: error: checkpoint {tmp_path}/checkpoints/4 is damaged")
    assert "Traceback" not in run.stderr and "Event loop is closed" not in run.stderr, run.stderr
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # nothing removed or written


def _tiny(model_path: Path, steps: int) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), "--model", "tiny", "--set", f"train_steps={steps}",
            "--set", f"model_path={json.dumps(str(model_path))}", "--steps_per_checkpoint", "2"]


def test_a_save_that_cannot_be_written_stops_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: tensorstore's write fails the
    same way (measured on a full tmpfs too: RESOURCE_EXHAUSTED, No space left on device)."""
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
    subprocess.run(_tiny(tmp_path, 2), env=env, check=True, capture_output=True, timeout=300)

    # (a write past the limit then fails with EFBIG rather than killing the process; both survive exec)
    small_files = [sys.executable, "-c", "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, "
                   "signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
                   "os.execv(sys.executable, sys.argv[1:])"]
    run = subprocess.run(small_files + _tiny(tmp_path, 4), env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"neo: error: writing checkpoint 4 to {tmp_path}/checkpoints failed (")
    assert last.endswith("checkpoint 2 is intact, and the partial one was removed. Free space on that disk (or "
                         "lower keep_checkpoints, or move model_path), then rerun to resume."), last
    assert "Traceback" not in run.stderr and "Task exception" not in run.stderr, run.stderr
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    rerun = subprocess.run(_tiny(tmp_path, 4), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "resumed from checkpoint 2" in rerun.stdout, rerun.stderr


def test_a_disk_that_cannot_hold_a_checkpoint_is_refused_before_compiling(tmp_path, monkeypatch):
    import shutil

    logged = []
    usage = lambda free: lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free)
    monkeypatch.setattr(shutil, "disk_usage", usage(5 * 2**20))
    with pytest.raises(NeoError, match=r"model_path .*/run: its disk has 5.00 MiB free, but one checkpoint of this "
                                       r"model \(parameters and optimizer state\) takes ~9.54 MiB"):
        check_disk_space(str(tmp_path / "run"), 10**7, saves=3, keep=5, log=logged.append)
    check_disk_space(str(tmp_path / "run"), 2 * 10**6, saves=3, keep=5, log=logged.append)
    assert logged == ["neo: WARNING: model_path's disk has 5.00 MiB free; 3 checkpoints of ~1.91 MiB each may be "
                      "on it at once (keep_checkpoints 5, plus the one being written): a save may fail for want of "
                      "space (the run then stops, the previous checkpoint intact)."]
    check_disk_space(str(tmp_path / "run"), 2 * 10**6, saves=3, keep=1, log=logged.append)  # 2 at once: fits
    check_disk_space("gs://bucket/run", 10**12, saves=3, keep=5, log=logged.append)  # not this machine's disk
    assert len(logged) == 1
