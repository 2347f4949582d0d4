"""The tfrecord input pipeline: sampling modes, mixing, batches independent of the number of
processes reading them, exact resume, bad data."""

import json

import numpy as np
import pytest

from neo.config import parse_model_config
from neo.data import PAD
from neo.errors import NeoError

N_CTX = 8


def write_records(path_prefix, records):
    """One GPT-Neo tfrecord file holding `records` (lists of ids); returns its path."""
    from neo.data.tfrecords import RecordWriter

    w = RecordWriter(str(path_prefix))
    for r in records:
        w.write(np.asarray(r))
    return w.close()


def dataset(tmp_path, name, files, **keys):
    """Write `files` (lists of records) as <name>_<i>_<count>.tfrecords and its dataset config."""
    folder = tmp_path / name
    folder.mkdir()
    for i, records in enumerate(files):
        write_records(folder / f"{name}_{i}", records)
    cfg = {"n_vocab": 1000, "path": str(folder / f"{name}_*.tfrecords"), "eos_id": 999, "padding_id": 998, **keys}
    (tmp_path / "dataset_configs").mkdir(exist_ok=True)
    (tmp_path / "dataset_configs" / f"{name}.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def model(tiny_config):
    def make(tmp_path, datasets, **overrides):
        raw = tiny_config(**{"n_ctx": N_CTX, "n_vocab": 1000, "train_batch_size": 4, "datasets": datasets, **overrides})
        path = tmp_path / "model.json"
        path.write_text(json.dumps(raw))
        from neo.config import load_model_config

        return load_model_config(str(path))

    return make


def chunk_records(n, start=0, length=N_CTX + 1):
    return [[(start + i) % 900] * 0 + list(range((start + i) * 10 % 900, (start + i) * 10 % 900 + length))
            for i in range(n)]


def doc_records(n, start=0):
    """Documents of varied lengths 3..12 whose tokens encode (document, position)."""
    return [[((start + i) * 37 + k) % 900 for k in range(3 + (start + i) % 10)] for i in range(n)]


def batches(source, n):
    return [next(source).copy() for _ in range(n)]


def test_chunks_visit_every_record_once_per_epoch(tmp_path, model):
    from neo.data import make_source

    recs = [chunk_records(7, 0), chunk_records(5, 7), chunk_records(8, 12)]
    dataset(tmp_path, "c", recs)
    cfg = model(tmp_path, [["c", None, "chunks", None]])
    src = make_source(cfg)
    rows = np.concatenate(batches(src, 5))  # 20 rows = one epoch of 20 records
    assert rows.shape == (20, N_CTX + 1) and rows.dtype == np.int32
    assert sorted(map(tuple, rows)) == sorted(tuple(r) for f in recs for r in f)
    assert not np.array_equal(rows[:7], np.array(recs[0]))  # shuffled, not file order


def test_chunks_longer_records_give_windows_sharing_one_token(tmp_path, model):
    from neo.data import make_source

    rec = list(range(2 * N_CTX + 1))
    dataset(tmp_path, "long", [[rec] * 3])
    src = make_source(model(tmp_path, [["long", None, "chunks", None]]))
    rows = next(src)
    assert {tuple(r) for r in rows} == {tuple(rec[:N_CTX + 1]), tuple(rec[N_CTX:])}


def test_documents_fixed_stitches_with_eos_and_pads(tmp_path, model):
    from neo.data import make_source

    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 999], [9]]
    dataset(tmp_path, "d", [docs])
    cfg = model(tmp_path, [["d", 2, "documents_fixed", None]], shuffle_input_filenames=False)
    rows = [tuple(r) for r in np.concatenate(batches(make_source(cfg), 1))]
    # the 4 docs are shuffled, then grouped in pairs: every row is pair[0] eos pair[1], padded
    # with PAD (never padding_id 998: padding is marked by the data side, docs/data.md)
    for row in rows:
        assert len(row) == N_CTX + 1
        assert row.count(999) >= 1 and row[-1] == PAD and 998 not in row
    flat = [t for r in rows for t in r if t not in (PAD, 999)]
    assert sorted(flat) == sorted(list(range(1, 10)) * 2)  # two groups per epoch, batch of 4 = 2 epochs


def test_documents_random_windows_come_from_stitched_documents(tmp_path, model):
    from neo.data import make_source

    docs = [list(range(100 + 20 * i, 110 + 20 * i)) for i in range(6)]  # 10 tokens each
    dataset(tmp_path, "r", [docs], minimum_size=10)
    cfg = model(tmp_path, [["r", 2, "documents_random", None]])
    rows = np.concatenate(batches(make_source(cfg), 6))
    stream = [t for d in docs for t in d]
    starts = set()
    for row in rows:
        pieces = np.split(row, np.flatnonzero(row == 999))
        for piece in pieces:  # each piece between separators is a run of one document
            piece = piece[piece != 999]
            assert (np.diff(piece) == 1).all() and (len(piece) == 0 or piece[0] in stream)
        starts.add(int(row[0]))
    assert len(starts) > 3  # the offsets are random
    assert any(999 in row for row in rows)  # and some windows cross from one document into the next


def test_documents_random_stitch_too_small_is_a_config_error(tmp_path, model):
    dataset(tmp_path, "r", [doc_records(4)], minimum_size=3)
    with pytest.raises(NeoError, match=r"stitch x minimum_size >= n_ctx \+ 1.*1 x 3 = 3 < 9; set stitch to at least 3"):
        model(tmp_path, [["r", 1, "documents_random", None]])


def test_same_seed_same_batches_other_seed_other_batches(tmp_path, model):
    from neo.data import make_source

    dataset(tmp_path, "c", [chunk_records(30)])
    a = batches(make_source(model(tmp_path, [["c", None, "chunks", None]])), 4)
    b = batches(make_source(model(tmp_path, [["c", None, "chunks", None]])), 4)
    c = batches(make_source(model(tmp_path, [["c", None, "chunks", None]], seed=7)), 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_mixture_follows_the_weights(tmp_path):
    from neo.data.mixture import PERIOD, MixSchedule

    def counts(s, j):  # examples each dataset gave among the first j
        return np.bincount(s.take(0, j), minlength=len(s.quotas)).tolist()

    s = MixSchedule([3.0, 1.0], (1,))
    assert counts(s, PERIOD) == [3 * PERIOD // 4, PERIOD // 4]
    first = s.take(0, 2000)
    assert 0.72 < (first == 0).mean() < 0.78
    assert counts(s, PERIOD + 500) == [3 * PERIOD // 4 + int((s.take(PERIOD, 500) == 0).sum()),
                                       PERIOD // 4 + int((s.take(PERIOD, 500) == 1).sum())]
    # an example's index within its dataset is how many examples that dataset gave before it
    g = np.arange(PERIOD - 300, PERIOD + 300)
    datasets, index = s.locate(g)
    for d in (0, 1):
        assert (index[datasets == d] == counts(s, int(g[0]))[d] + np.arange((datasets == d).sum())).all()
    tiny = MixSchedule([1.0, 1e-9], (1,))
    assert counts(tiny, PERIOD) == [PERIOD - 1, 1]  # every dataset is sampled


@pytest.fixture
def mixed_config(model):
    def make(tmp_path):
        dataset(tmp_path, "c", [chunk_records(6), chunk_records(5, 6)])
        dataset(tmp_path, "d", [doc_records(9), doc_records(4, 9)], minimum_size=3)
        return model(tmp_path, [["c", None, "chunks", 2.0], ["d", 3, "documents_random", 1.0]])

    return make


def test_mixed_batches_draw_from_both_datasets(tmp_path, mixed_config):
    from neo.data import make_source

    rows = np.concatenate(batches(make_source(mixed_config(tmp_path)), 10))
    from_docs = (rows == 999).any(axis=1) | (rows == 998).any(axis=1)
    assert 0.15 < from_docs.mean() < 0.55


@pytest.mark.parametrize("which", ["chunks", "mixed"])
def test_restore_continues_exactly(tmp_path, which, mixed_config, model):
    """Batches after restore(state after k) equal batches k, k+1, ... of an uninterrupted run,
    including across epoch boundaries (11 and 13 records: several epochs in 30 batches)."""
    from neo.data import make_source

    cfg = mixed_config(tmp_path) if which == "mixed" else None
    if cfg is None:
        dataset(tmp_path, "c", [chunk_records(6), chunk_records(5, 6)])
        cfg = model(tmp_path, [["c", None, "chunks", None]])
    src = make_source(cfg)
    states, expected = [], []
    for _ in range(30):
        states.append(json.loads(json.dumps(src.state())))
        expected.append(next(src).copy())
    for k in (0, 2, 3, 11, 29):
        fresh = make_source(cfg)
        fresh.restore(states[k])
        got = batches(fresh, min(4, 30 - k))
        for i, g in enumerate(got):
            np.testing.assert_array_equal(g, expected[k + i], err_msg=f"restored at {k}, batch {k + i}")
        assert fresh.state()["step"] == k + len(got)


def test_resume_after_a_block_boundary(tmp_path, monkeypatch, model):
    """Resuming in the middle of a shuffle block re-reads that block and continues exactly."""
    from neo.data import make_source, sampling

    monkeypatch.setattr(sampling, "SHUFFLE_BLOCK", 4)
    dataset(tmp_path, "d", [doc_records(10), doc_records(7, 10)])
    cfg = model(tmp_path, [["d", 2, "documents_fixed", None]])
    src = make_source(cfg)
    expected = batches(src, 12)
    for k in (1, 5, 9):
        fresh = make_source(cfg)
        fresh.restore({"step": k, "examples": 4 * k, "batch_size": 4})
        np.testing.assert_array_equal(next(fresh), expected[k])


def test_resuming_on_other_data_is_said(tmp_path, model):
    """The position is a count of examples: on other files (one added to the glob, say) it
    points elsewhere in another order, so a resume there is warned about; on the same, nothing."""
    from neo.data import make_source

    folder = dataset(tmp_path, "c", [chunk_records(6)])
    cfg = model(tmp_path, [["c", None, "chunks", None]])
    saved = json.loads(json.dumps(make_source(cfg).state()))
    assert make_source(cfg).restore(saved) == []
    write_records(folder / "c_1", chunk_records(6, 6))
    (note,) = make_source(cfg).restore(saved)
    assert note.startswith("the datasets differ from those the checkpoint was trained on (name, files, records, "
                           "sampling mode, stitch, weight: [['c', 1, 6, 'chunks', 1, 1.0]] then, "
                           "[['c', 2, 12, 'chunks', 1, 1.0]] now)")
    (note,) = make_source(model(tmp_path, [["c", None, "chunks", None]], train_batch_size=8)).restore(
        {**saved, "datasets": make_source(cfg).state()["datasets"]})
    assert note == "train_batch_size changed from 4 to 8; the data continues after the 0 examples already trained on."


def test_processes_read_disjoint_rows(tmp_path, model):
    from neo.data import make_source

    recs = [chunk_records(4, 0), chunk_records(4, 4), chunk_records(4, 8), chunk_records(4, 12)]
    dataset(tmp_path, "c", recs)
    cfg = model(tmp_path, [["c", None, "chunks", None]])
    seen = []
    for p in range(2):
        src = make_source(cfg, "train", rows=[2 * p, 2 * p + 1])
        rows = np.concatenate(batches(src, 4))  # 2 rows x 4 = 8 = this process's share of one epoch
        assert rows.shape == (8, N_CTX + 1)
        seen.append({tuple(r) for r in rows})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {tuple(r) for f in recs for r in f}


def test_one_file_is_shared_by_processes(tmp_path, model):
    from neo.data import make_source

    recs = chunk_records(8)
    dataset(tmp_path, "one", [recs])
    cfg = model(tmp_path, [["one", None, "chunks", None]])
    # two batches of 4 = one epoch, its 8 records split between the two processes' rows
    a = {tuple(r) for r in np.concatenate(batches(make_source(cfg, "train", rows=[0, 1]), 2))}
    b = {tuple(r) for r in np.concatenate(batches(make_source(cfg, "train", rows=[2, 3]), 2))}
    assert not a & b and a | b == {tuple(r) for r in recs}


# Row sets of an 8-row batch, as processes hold them (compared with one process reading all
# rows): 2 x 4 devices, 4 x 2, and two
# processes that both hold every row (the batch split over devices within each process only,
# another axis spanning the processes).
SPLITS = {"2x4": [range(4), range(4, 8)], "4x2": [range(0, 2), range(2, 4), range(4, 6), range(6, 8)],
          "replicated": [range(8), range(8)]}


@pytest.fixture(params=["chunks", "chunks_2_windows", "documents_fixed", "documents_random", "mixture", "text"])
def any_source_config(request, tmp_path, model, monkeypatch):
    """A config of each kind of source, with 4-record shuffle blocks so batches cross blocks."""
    from neo.data import sampling

    monkeypatch.setattr(sampling, "SHUFFLE_BLOCK", 4)
    kind = request.param
    if kind == "text":
        from neo.config import load_model_config

        return load_model_config("quickstart", {"train_batch_size": 8})
    dataset(tmp_path, "c", [chunk_records(20), chunk_records(15, 20)])
    dataset(tmp_path, "c2", [chunk_records(5, length=2 * N_CTX + 1), chunk_records(4, 5, length=2 * N_CTX + 1)])
    dataset(tmp_path, "d", [doc_records(40), doc_records(30, 40)], minimum_size=3)
    entries = {"chunks": [["c", None, "chunks", None]], "chunks_2_windows": [["c2", None, "chunks", None]],
               "documents_fixed": [["d", 2, "documents_fixed", None]],
               "documents_random": [["d", 3, "documents_random", None]],
               "mixture": [["c", None, "chunks", 2.0], ["d", 3, "documents_random", 1.0], ["c2", None, "chunks", 1.0]]}
    return model(tmp_path, entries[kind], train_batch_size=8)


@pytest.mark.parametrize("split", SPLITS)
def test_global_batches_do_not_depend_on_the_processes(any_source_config, split):
    """Every process reading its rows assembles exactly the batches one process reads, in
    every sampling mode and mixture, across shuffle blocks and epochs; and a state saved by
    one process restores the exact stream on another split (and the reverse)."""
    from neo.data import make_source

    cfg = any_source_config
    whole = make_source(cfg)
    expected = batches(whole, 12)
    parts = [make_source(cfg, "train", rows=list(r)) for r in SPLITS[split]]
    for step in range(6):
        for rows, part in zip(SPLITS[split], parts):
            np.testing.assert_array_equal(next(part), expected[step][list(rows)], err_msg=f"step {step}, rows {rows}")
    saved = json.loads(json.dumps(parts[-1].state()))  # saved by the split, restored by one process
    single = make_source(cfg)
    single.restore(saved)
    np.testing.assert_array_equal(next(single), expected[6])
    resumed = [make_source(cfg, "train", rows=list(r)) for r in SPLITS[split]]
    for part in resumed:  # saved by one process, restored by the split
        part.restore(json.loads(json.dumps(single.state())))
    for step in range(7, 12):
        for rows, part in zip(SPLITS[split], resumed):
            np.testing.assert_array_equal(next(part), expected[step][list(rows)], err_msg=f"resumed, step {step}")


def test_rows_become_the_global_sharded_batch(tmp_path, model):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from neo.data import make_source
    from neo.mesh import assemble_rows, process_rows

    dataset(tmp_path, "c", [chunk_records(16)])
    cfg = model(tmp_path, [["c", None, "chunks", None]], train_batch_size=8)
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), P("x", None))
    rows = process_rows(sharding, 8)
    local = next(make_source(cfg, "train", rows))
    batch = assemble_rows(sharding, rows, local, 8)
    assert batch.shape == (8, N_CTX + 1) and len(batch.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(batch), local)


@pytest.mark.parametrize("entry", [["c", None, "chunks", None], ["d", 3, "documents_random", None]])
def test_each_process_reads_only_the_bytes_of_its_rows(tmp_path, model, monkeypatch, entry):
    """Over an epoch and a half of 8-row batches, 2 and 4 readers of disjoint rows each read
    their share of the record bytes one reader reads (together exactly as many), and indexing a
    file reads its 12-byte record headers, not its data."""
    from neo.data import make_source, mixture, tfrecords

    monkeypatch.setattr(mixture, "READ_AHEAD", 1)  # one batch per read, so every reader is at the same step
    dataset(tmp_path, "c", [chunk_records(50), chunk_records(46, 50)])
    dataset(tmp_path, "d", [doc_records(150), doc_records(138, 150)], minimum_size=3)
    cfg = model(tmp_path, [entry], train_batch_size=8)
    records = 96 if entry[0] == "c" else 288

    def bytes_read(rows):
        tfrecords.READS.__init__()
        src = make_source(cfg, "train", rows=rows)
        tfrecords.READS.record_bytes = 0  # not the record `chunks` reads at the start for its length
        for _ in range(18):
            next(src)
        assert tfrecords.READS.index_bytes == 12 * records  # every file indexed once, by its headers
        return tfrecords.READS.record_bytes

    whole = bytes_read(range(8))
    for readers in (2, 4):
        shares = [bytes_read(range(r * 8 // readers, (r + 1) * 8 // readers)) for r in range(readers)]
        assert sum(shares) == whole
        assert all(0.7 / readers < share / whole < 1.3 / readers for share in shares), (readers, shares, whole)


def test_records_are_read_by_position_through_tensorflow_file_systems(tmp_path, model):
    """A dataset on a tf.io.gfile file system (ram:// here, gs:// in use) gives the batches of
    the same files on local disk."""
    from neo.data import make_source
    from neo.data.tfrecords import tensorflow

    tf = tensorflow()
    folder = dataset(tmp_path, "c", [chunk_records(7), chunk_records(6, 7)])
    remote = f"ram://{tmp_path.name}/c"
    for f in folder.glob("*.tfrecords"):
        tf.io.gfile.copy(str(f), f"{remote}/{f.name}")
    local = batches(make_source(model(tmp_path, [["c", None, "chunks", None]])), 6)
    cfg_path = tmp_path / "dataset_configs" / "c.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "path": f"{remote}/c_*.tfrecords"}))
    on_ram = batches(make_source(model(tmp_path, [["c", None, "chunks", None]])), 6)
    for a, b in zip(local, on_ram):
        np.testing.assert_array_equal(a, b)


def test_records_are_the_bytes_tensorflow_writes_and_parse_as_it_parses(tmp_path):
    """neo writes and parses tfrecords without TensorFlow (neo/data/example_proto.py): a file
    it writes is byte for byte what TensorFlow's TFRecordWriter writes from tf.train.Example,
    and payloads TensorFlow makes (other features beside "text", none, an empty list, ids past
    int32, negative ids) give TensorFlow's own ParseExampleV2 ids and row splits."""
    from pathlib import Path

    from neo.data.example_proto import _parse_canonical, parse_texts
    from neo.data.tfrecords import tensorflow

    tf = tensorflow()
    ints = lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=v))
    example = lambda **f: tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString()
    records = [[0, 1, 2 ** 40, -5, 50256], [], list(range(3000)), [7]]
    theirs = tmp_path / "theirs_4.tfrecords"
    with tf.io.TFRecordWriter(str(theirs)) as w:
        for r in records:
            w.write(example(text=ints(r)))
    assert Path(write_records(tmp_path / "ours", records)).read_bytes() == theirs.read_bytes()
    payloads = [example(text=ints([7, 8, 9])), example(input_ids=ints([1]), text=ints([2 ** 33, -4]),
                mask=tf.train.Feature(float_list=tf.train.FloatList(value=[1.0]))), example(input_ids=ints([1])),
                example(text=ints([])), example(), example(text=ints(list(range(300))))]
    ref = tf.raw_ops.ParseExampleV2(
        serialized=payloads, names=[], sparse_keys=[], dense_keys=[], ragged_keys=["text"], dense_defaults=[],
        num_sparse=0, sparse_types=[], ragged_value_types=[tf.int64], ragged_split_types=[tf.int64], dense_shapes=[])
    values, splits = parse_texts(payloads)
    np.testing.assert_array_equal(values, ref.ragged_values[0].numpy())
    np.testing.assert_array_equal(splits, ref.ragged_row_splits[0].numpy())
    # Records in TensorFlow's own layout are decoded together (ids of 1 to 10 varint bytes);
    # one record of another layout sends the batch to protobuf's parser.
    canonical = [example(text=ints(r)) for r in records if r] * 3
    assert _parse_canonical(canonical) is not None and _parse_canonical(payloads) is None
    for other in (example(text=ints([3, 4]), zzz=ints([5])), example(zzz=ints([5]), text=ints([3, 4]))):
        assert _parse_canonical([other]) is None  # a feature beside "text", before or after it
        np.testing.assert_array_equal(parse_texts([other])[0], [3, 4])
    values, splits = parse_texts(canonical)
    np.testing.assert_array_equal(values, np.concatenate([r for r in records if r] * 3))
    np.testing.assert_array_equal(splits, np.cumsum([0] + [len(r) for r in records if r] * 3))


def test_training_reads_local_records_without_importing_tensorflow(tmp_path, model):
    """Listing and reading local tfrecords for training takes no TensorFlow (3-4 s and a few
    hundred MB per process): a child process draws batches of every sampling mode and mixture
    without it ever being imported."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    dataset(tmp_path, "c", [chunk_records(9), chunk_records(9, 9)])
    dataset(tmp_path, "d", [doc_records(30)])
    model(tmp_path, [["c", None, "chunks", 1.0], ["d", None, "documents_random", 2.0]])
    child = ("import sys; from neo.config import load_model_config; from neo.data import make_source; "
             f"src = make_source(load_model_config({str(tmp_path / 'model.json')!r})); [next(src) for _ in range(5)]; "
             "print('tensorflow' in sys.modules)")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0 and out.stdout.split() == ["False"], out.stderr[-2000:]


def test_eval_split_reads_eval_path(tmp_path, model):
    from neo.data import make_source

    folder = dataset(tmp_path, "c", [chunk_records(8)])
    write_records(folder / "val_0", chunk_records(4, 500))
    cfg_path = tmp_path / "dataset_configs" / "c.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "eval_path": str(folder / "val_*.tfrecords")}))
    src = make_source(model(tmp_path, [["c", None, "chunks", None]], eval_batch_size=4), "eval")
    assert {tuple(r) for r in next(src)} == {tuple(r) for r in chunk_records(4, 500)}


# --- bad data: clear errors naming the file


def test_token_ids_outside_the_model_vocabulary_are_refused(tmp_path, model):
    from neo.data import make_source

    folder = dataset(tmp_path, "c", [chunk_records(3)])
    write_records(folder / "c_9", [[5] * N_CTX + [1500]])
    with pytest.raises(NeoError, match=r"c_9_1.tfrecords: record 0 holds token id 1500, outside the model's vocabulary 0..999"):
        for _ in range(4):
            next(make_source(model(tmp_path, [["c", None, "chunks", None]])))


def test_empty_glob_names_the_glob_and_dataset(tmp_path, model):
    from neo.data import make_source

    (tmp_path / "dataset_configs").mkdir()
    (tmp_path / "dataset_configs" / "gone.json").write_text(json.dumps({"n_vocab": 1000, "path": str(tmp_path / "nope_*.tfrecords")}))
    with pytest.raises(NeoError, match=r"dataset 'gone' \(.*gone.json\), path: no files match .*nope_\*.tfrecords"):
        make_source(model(tmp_path, [["gone", None, "chunks", None]]))


def test_truncated_file_names_the_file(tmp_path, model):
    from neo.data import make_source

    folder = dataset(tmp_path, "c", [chunk_records(6)])
    (path,) = folder.glob("*.tfrecords")
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(NeoError, match=rf"{path.name} is corrupt or truncated after record"):
        next(make_source(model(tmp_path, [["c", None, "chunks", None]])))


def test_a_truncated_file_names_its_last_good_record_both_ways(tmp_path):
    """Training (which walks the length headers) and --check_dataset (which reads the file whole,
    through tf.data, in batches) name the same record, not the start of the batch that failed."""
    from neo.data.tfrecords import read_records, record_offsets

    folder = dataset(tmp_path, "c", [chunk_records(6)])
    (path,) = folder.glob("*.tfrecords")
    path.write_bytes(path.read_bytes()[:-20])
    for read in record_offsets, lambda p: list(read_records(p)):
        with pytest.raises(NeoError, match=rf"{path.name} is corrupt or truncated after record 5 "):
            read(str(path))


def test_a_damaged_record_fails_its_checksum(tmp_path, model):
    """A flipped byte in a record's data (its length intact) is caught when the record is read."""
    from neo.data import make_source

    folder = dataset(tmp_path, "c", [chunk_records(6)])
    (path,) = folder.glob("*.tfrecords")
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0x01  # inside the last record's token ids
    path.write_bytes(bytes(raw))
    with pytest.raises(NeoError, match=rf"{path.name} is corrupt: record 5 fails its checksum"):
        batches(make_source(model(tmp_path, [["c", None, "chunks", None]])), 2)


def test_a_compressed_file_is_refused_with_the_fix(tmp_path, model):
    from neo.data import make_source
    from neo.data.tfrecords import tensorflow

    tf = tensorflow()
    folder = dataset(tmp_path, "c", [chunk_records(2)])
    (path,) = folder.glob("*.tfrecords")
    with tf.io.TFRecordWriter(str(folder / "c_1_2.tfrecords"), options="GZIP") as w:
        for r in tf.data.TFRecordDataset(str(path)):
            w.write(r.numpy())
    with pytest.raises(NeoError, match=r"c_1_2.tfrecords is compressed \(GZIP or ZLIB\).*decompress it"):
        batches(make_source(model(tmp_path, [["c", None, "chunks", None]])), 2)


def test_record_without_text_feature_names_the_file(tmp_path, model):
    from neo.data import make_source
    from neo.data.tfrecords import tensorflow

    tf = tensorflow()
    folder = dataset(tmp_path, "c", [chunk_records(2)])
    bad = folder / "c_5_1.tfrecords"
    with tf.io.TFRecordWriter(str(bad)) as w:
        feature = tf.train.Feature(int64_list=tf.train.Int64List(value=list(range(9))))
        w.write(tf.train.Example(features=tf.train.Features(feature={"input_ids": feature})).SerializeToString())
    with pytest.raises(NeoError, match=r"c_5_1.tfrecords: record 0 has no 'text' feature \(it has \['input_ids'\]\)"):
        src = make_source(model(tmp_path, [["c", None, "chunks", None]]))
        batches(src, 2)


def test_a_record_not_in_gpt_neos_format_names_the_file_and_the_record(tmp_path, model):
    """A payload that is not a tf.train.Example, or whose "text" holds floats, is an error
    naming the file and the record (its framing and checksums being intact)."""
    import struct

    from neo.data import make_source
    from neo.data.example_proto import _messages, serialize_text
    from neo.data.tfrecords import _masked_crc

    floats = _messages()["Example"]()
    floats.features.feature["text"].float_list.value.extend([1.0, 2.0])
    for payload, message in [(floats.SerializeToString(), r"the 'text' feature of record 1 is not an int64 list"),
                             (b"\xff\xff\xff\xff", r"record 1 is not a serialized tf.train.Example")]:
        folder = tmp_path / f"case{len(payload)}"
        folder.mkdir()
        with open(folder / "c_0_2.tfrecords", "wb") as f:
            for data in (serialize_text(range(N_CTX + 1)), payload):
                head = struct.pack("<Q", len(data))
                f.write(head + struct.pack("<I", _masked_crc(head)) + data + struct.pack("<I", _masked_crc(data)))
        (tmp_path / "dataset_configs").mkdir(exist_ok=True)
        (tmp_path / "dataset_configs" / "c.json").write_text(json.dumps(
            {"n_vocab": 1000, "path": str(folder / "c_*.tfrecords"), "eos_id": 999, "padding_id": 998}))
        with pytest.raises(NeoError, match=rf"c_0_2.tfrecords: {message}"):
            batches(make_source(model(tmp_path, [["c", None, "chunks", None]])), 2)


def test_a_wrong_count_in_the_name_is_caught(tmp_path, model):
    from neo.data import make_source

    folder = dataset(tmp_path, "c", [chunk_records(4)])
    (path,) = folder.glob("*.tfrecords")
    path.rename(folder / "c_0_3.tfrecords")
    with pytest.raises(NeoError, match=r"c_0_3.tfrecords: holds more records than its name says \(3\)"):
        batches(make_source(model(tmp_path, [["c", None, "chunks", None]])), 2)


def test_short_chunk_records_are_a_clear_error(tmp_path, model):
    from neo.data import make_source

    dataset(tmp_path, "c", [chunk_records(4, length=5)])
    with pytest.raises(NeoError, match=r"records hold 5 tokens, fewer than n_ctx \+ 1 = 9.*--chunk_size 8"):
        make_source(model(tmp_path, [["c", None, "chunks", None]]))


def test_text_dataset_still_works(tiny_config):
    from neo.config import load_model_config
    from neo.data import make_source

    src = make_source(load_model_config("quickstart"))
    assert next(src).shape == (12, 65)
    assert parse_model_config(tiny_config()).data.datasets == ()


def test_a_dataset_path_may_be_a_folder_a_glob_or_a_file_url(tmp_path):
    """A folder means its *.tfrecords (folders named so are skipped), files come in natural order
    (2 before 10), a file:// path keeps its scheme, and an empty match names the config and glob."""
    from neo.data.tfrecords import list_files

    (tmp_path / "sub.tfrecords").mkdir()
    for name in ("a_10.tfrecords", "a_2.tfrecords", "notes.txt"):
        (tmp_path / name).touch()
    records = [str(tmp_path / "a_2.tfrecords"), str(tmp_path / "a_10.tfrecords")]
    assert list_files(str(tmp_path), "cfg") == list_files(f"{tmp_path}/", "cfg") == records
    assert list_files(f"{tmp_path}/*.tfrecords", "cfg") == records
    assert list_files(f"file://{tmp_path}", "cfg") == ["file://" + f for f in records]
    assert list_files(f"file://{tmp_path}/*", "cfg") == ["file://" + f for f in records + [str(tmp_path / "notes.txt")]]
    with pytest.raises(NeoError, match=r"cfg: no files match .*missing \(no glob characters"):
        list_files(str(tmp_path / "missing"), "cfg")
