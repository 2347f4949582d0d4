"""Text in, tfrecords out: train_tokenizer.py, create_tfrecords.py and --check_dataset on real text."""

import functools
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from neo.errors import NeoError

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = "20B_tokenizer.json"


def records_of(folder, pattern="*.tfrecords"):
    from neo.data.tfrecords import read_records
    from neo.data.tfrecords import natural_key

    files = sorted((str(p) for p in Path(folder).glob(pattern)), key=natural_key)
    return [r.tolist() for f in files for r in read_records(f)]


def create(tmp_path, input_dir, **kw):
    from neo.data.prep.create_tfrecords import Options, create_tfrecords

    opts = dict(input_dir=str(input_dir), output_dir=str(tmp_path / "out"), name="t", processes=1, progress=False,
                minimum_size=1)
    opts.update(kw)
    return create_tfrecords(Options(**opts), log=lambda *a: None)


@pytest.fixture(scope="module")
def lambada(tmp_path_factory, data_dir):
    """LAMBADA (5,153 documents) as document-mode tfrecords with the GPT-NeoX-20B tokenizer."""
    out = tmp_path_factory.mktemp("lambada")
    from neo.data.prep.create_tfrecords import Options, create_tfrecords

    stats = create_tfrecords(Options(input_dir=str(data_dir / "lambada_openai_test.jsonl"), output_dir=str(out),
                                     name="lambada", encoder_path=str(data_dir / TOKENIZER), mode="documents",
                                     minimum_size=1, processes=1, progress=False, write_dataset_config=True),
                             log=lambda *a: None)
    return out, stats


@functools.lru_cache(maxsize=1)
def independent_encode(data_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data_dir / TOKENIZER))
    texts = [json.loads(line)["text"] for line in (data_dir / "lambada_openai_test.jsonl").open()]
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def test_lambada_documents_are_the_tokenizer_output_plus_separator(lambada, data_dir):
    out, stats = lambada
    expected = independent_encode(data_dir)
    assert stats.documents == stats.records == 5153
    assert [p.name for p in out.glob("*.tfrecords")] == ["lambada_0_5153.tfrecords"]
    assert records_of(out) == [ids + [0] for ids in expected]  # <|endoftext|> is 0 in this tokenizer
    cfg = json.loads((out / "lambada.json").read_text())
    assert (cfg["n_vocab"], cfg["eos_id"], cfg["padding_id"]) == (50277, 0, 1)


def test_check_dataset_counts_lambada_exactly(lambada, data_dir, tmp_path):
    """`main.py --check_dataset`: 5,153 documents and the token count of an independent encode."""
    out, _ = lambada
    model = {"n_embd": 32, "n_head": 4, "n_layer": 1, "n_ctx": 64, "n_vocab": 50304,
             "attention_types": [[["global"], 1]], "train_batch_size": 2,
             "datasets": [[str(out / "lambada.json"), 1, "documents_fixed", None]]}
    (tmp_path / "m.json").write_text(json.dumps(model))
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "main.py"), "--model", str(tmp_path / "m.json"), "--check_dataset"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    text_tokens = sum(len(ids) for ids in independent_encode(data_dir))
    assert "documents  5,153" in run.stdout
    assert f"tokens     {text_tokens + 5153:,}  ({text_tokens:,} in documents + 5,153 separators)" in run.stdout
    assert "token ids  0 .. 50,276  (dataset n_vocab 50,277, model n_vocab 50,304): ok" in run.stdout
    assert "training example 1 of the first batch: 65 tokens" in run.stdout
    assert run.stdout.count("training example") == 2  # batch of 2: both shown, decoded to text
    lines = run.stdout.splitlines()
    start = lines.index(next(l for l in lines if "training example 1" in l)) + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("---"))
    decoded = "\n".join(lines[start:end])  # the example's text, whichever document comes first
    corpus = "".join(json.loads(line)["text"] for line in (data_dir / "lambada_openai_test.jsonl").open())
    assert len(decoded) > 20 and decoded in corpus


def test_check_dataset_refuses_out_of_vocabulary_ids(tmp_path):
    from neo.config import load_model_config
    from neo.data.tfrecords import RecordWriter
    from neo.data.check import check_dataset

    (tmp_path / "d").mkdir()
    for i, top in enumerate((50, 70)):
        w = RecordWriter(str(tmp_path / "d" / f"x_{i}"))
        w.write(np.arange(top - 9, top + 1))
        w.close()
    (tmp_path / "dataset_configs").mkdir()
    (tmp_path / "dataset_configs" / "x.json").write_text(json.dumps({"n_vocab": 64, "path": str(tmp_path / "d" / "*.tfrecords")}))
    (tmp_path / "m.json").write_text(json.dumps({"n_embd": 32, "n_head": 4, "n_layer": 1, "n_ctx": 8, "n_vocab": 64,
                                                 "attention_types": [[["global"], 1]], "datasets": ["x"]}))
    lines = []
    with pytest.raises(NeoError, match=r"outside the vocabulary in 1 file\(s\):\n  .*x_1_1.tfrecords: token id 70"):
        check_dataset(load_model_config(str(tmp_path / "m.json")), log=lines.append)
    assert any("token ids  41 .. 70" in line and "ERROR in 1 file(s)" in line for line in lines)


def test_check_dataset_refuses_a_tokenizer_that_does_not_load(tmp_path):
    """The examples are decoded with the dataset's tokenizer; one that fails to load is an error
    naming its file, not a silent fall back to token ids."""
    from neo.config import load_model_config
    from neo.data.check import check_dataset
    from neo.data.tfrecords import RecordWriter

    (tmp_path / "d").mkdir()
    w = RecordWriter(str(tmp_path / "d" / "x_0"))
    for _ in range(4):
        w.write(np.arange(1, 11))
    w.close()
    (tmp_path / "broken.json").write_text("{not a tokenizer")
    (tmp_path / "dataset_configs").mkdir()
    (tmp_path / "dataset_configs" / "x.json").write_text(json.dumps(
        {"n_vocab": 64, "path": str(tmp_path / "d" / "*.tfrecords"), "tokenizer_path": str(tmp_path / "broken.json")}))
    (tmp_path / "m.json").write_text(json.dumps({"n_embd": 32, "n_head": 4, "n_layer": 1, "n_ctx": 8, "n_vocab": 64,
                                                 "attention_types": [[["global"], 1]], "datasets": ["x"],
                                                 "train_batch_size": 2}))
    with pytest.raises(NeoError, match=r"tokenizer file .*broken.json does not load"):
        check_dataset(load_model_config(str(tmp_path / "m.json")), log=lambda _: None)


def test_chunks_carry_tails_across_documents_and_files(tmp_path, data_dir):
    """The records are the documents' token stream cut into chunk_size+1 pieces: nothing is
    dropped but the final partial chunk, even when documents are shorter than a chunk."""
    from tokenizers import Tokenizer

    src = tmp_path / "in"
    src.mkdir()
    text = (data_dir / "tinyshakespeare.txt").read_text()[:20000]
    parts = text.split("\n\n")
    (src / "a.txt").write_text(parts[0])
    (src / "b.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in parts[1:40]))
    (src / "c.txt").write_text("\n\n".join(parts[40:]))
    stats = create(tmp_path, src, encoder_path=str(data_dir / TOKENIZER), mode="chunks", chunk_size=64, files_per=7)
    tok = Tokenizer.from_file(str(data_dir / TOKENIZER))
    stream = []
    for doc in [parts[0], *parts[1:40], "\n\n".join(parts[40:])]:
        stream += tok.encode(doc, add_special_tokens=False).ids + [0]
    records = records_of(tmp_path / "out")
    assert all(len(r) == 65 for r in records)
    assert [t for r in records for t in r] == stream[:len(records) * 65]
    assert len(stream) - len(records) * 65 == stats.tail_tokens_dropped < 65
    names = [Path(f).name for f in stats.files]
    assert names == [f"t_{i}_7.tfrecords" for i in range(13)] + ["t_13_1.tfrecords"] and len(records) == 92


def test_output_is_deterministic_across_process_counts(tmp_path, data_dir):
    src = tmp_path / "in"
    src.mkdir()
    lines = (data_dir / "lambada_openai_test.jsonl").read_text().splitlines()
    for i in range(3):
        (src / f"part{i}.jsonl").write_text("\n".join(lines[i * 100:(i + 1) * 100]) + "\n")
    a = create(tmp_path / "a", src, encoder_path=str(data_dir / TOKENIZER), mode="chunks", chunk_size=128, processes=1)
    b = create(tmp_path / "b", src, encoder_path=str(data_dir / TOKENIZER), mode="chunks", chunk_size=128, processes=2)
    assert a.files and [Path(f).name for f in a.files] == [Path(f).name for f in b.files]
    for fa, fb in zip(a.files, b.files):
        assert Path(fa).read_bytes() == Path(fb).read_bytes()


def test_reads_every_input_format_and_skips_bad_documents(tmp_path, capsys):
    import zstandard

    src = tmp_path / "in"
    src.mkdir()
    (src / "1.txt").write_text("plain text document")
    (src / "2.txt").write_bytes(b"latin-1 \xe9t\xe9")  # not UTF-8: skipped with a warning
    (src / "3.jsonl").write_text('{"text": "json line"}\nnot json\n{"meta": {}}\n"a bare string"\n')
    (src / "4.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        b'{"text": "zst one", "meta": {"a": 1}}\n{"text": ["para one", "para two"], "meta": {}}\n'))
    (src / "5.jsonl.gz").write_bytes(gzip.compress(b'{"text": "gz line"}\n'))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in (("x.txt", b"tar member one"), ("y.txt", b"tar member two")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    (src / "6.tar.gz").write_bytes(buf.getvalue())
    (src / "7.csv").write_text("ignored")
    stats = create(tmp_path, src, encoder_path="bytes", mode="documents", separator=0)
    got = [bytes(r[:-1]).decode() for r in records_of(tmp_path / "out")]
    assert got == ["plain text document", "json line", "a bare string", "zst one", "para one\n\npara two",
                   "gz line", "tar member one", "tar member two"]
    assert stats.skipped == 3 and stats.documents == 8
    err = capsys.readouterr().err
    assert "2.txt: not UTF-8 (byte 8)" in err and "3.jsonl line 2: not JSON" in err and "line 3: no 'text'" in err


def test_minimum_size_drops_short_documents(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "d.jsonl").write_text("".join(json.dumps({"text": "x" * n}) + "\n" for n in (3, 10, 4, 12)))
    stats = create(tmp_path, src, encoder_path="bytes", mode="documents", separator=0, minimum_size=5)
    assert [len(r) - 1 for r in records_of(tmp_path / "out")] == [10, 12] and stats.too_short == 2


def test_failure_leaves_no_complete_looking_file(tmp_path, monkeypatch):
    from neo.data.prep import create_tfrecords

    monkeypatch.setattr(create_tfrecords, "BATCH_CHARS", 100)  # write while still reading
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)))
    (src / "b.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage, not zstandard")
    with pytest.raises(NeoError, match=r"b.jsonl.zst"):
        create(tmp_path, src, encoder_path="bytes", mode="documents", separator=0, files_per=20)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == ["t_0_20.tfrecords", "t_1_20.tfrecords"]  # complete files only; no .partial
    with pytest.raises(NeoError, match=r"already holds 2 file\(s\) named t_\*.tfrecords"):
        create(tmp_path, src, encoder_path="bytes", mode="documents", separator=0)


def test_bad_tokenizer_and_empty_input_are_clear_errors(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("hello")
    (tmp_path / "tok.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(NeoError, match=r"tokenizer file .*tok.json does not load"):
        create(tmp_path, tmp_path / "in", encoder_path=str(tmp_path / "tok.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NeoError, match=r"empty: no input files"):
        create(tmp_path, tmp_path / "empty", encoder_path="bytes", separator=0)


def test_script_runs_from_the_command_line(tmp_path, data_dir):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("some text " * 100)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "data" / "create_tfrecords.py"), "--input_dir", str(tmp_path / "in"),
           "--output_dir", str(tmp_path / "out"), "--name", "s", "--encoder_path", str(data_dir / "gpt2"),
           "--mode", "chunks", "--chunk_size", "16", "--minimum_size", "1", "--separator", "[50256]", "--write_dataset_config",
           "--processes", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "wrote 11 chunks records, 187 tokens" in run.stdout  # 200 GPT-2 tokens + separator = 11 x 17 + 14
    cfg = json.loads((tmp_path / "out" / "s.json").read_text())
    assert cfg["n_vocab"] == 50257 and cfg["eos_id"] == 50256 and cfg["padding_id"] == 50256
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "already holds 1 file(s)" in bad.stderr and "Traceback" not in bad.stderr


def test_train_tokenizer_round_trips_and_has_the_special_tokens(tmp_path, data_dir):
    from tokenizers import Tokenizer

    src = tmp_path / "in"
    src.mkdir()
    text = (data_dir / "tinyshakespeare.txt").read_text()
    (src / "a.txt").write_text(text[:200000])
    (src / "b.txt").write_text(text[200000:300000])
    run = subprocess.run([sys.executable, str(ROOT / "data" / "train_tokenizer.py"), "--base_dir", str(src),
                          "--output_dir", str(tmp_path / "tok"), "--vocab_size", "600"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "<|endoftext|> = 0, <|padding|> = 1" in run.stdout
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "byte-level-bpe.tokenizer.json"))
    assert tok.get_vocab_size() == 600 and tok.token_to_id("<|endoftext|>") == 0
    sample = text[300000:302000] + " naïve café ✓"
    ids = tok.encode(sample).ids
    assert tok.decode(ids) == sample and len(ids) < len(sample.encode()) / 1.5


@pytest.mark.parametrize("tool,flag", [("create_tfrecords", "--input_dir"), ("train_tokenizer", "--base_dir")])
def test_prep_tools_run_as_modules(tool, flag):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", f"neo.data.prep.{tool}", "--help"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage:") and flag in run.stdout


def test_train_tokenizer_errors(tmp_path):
    from neo.data.prep.train_tokenizer import train_tokenizer

    (tmp_path / "in").mkdir()
    with pytest.raises(NeoError, match=r"no input files \(\*.txt\)"):
        train_tokenizer(str(tmp_path / "in"), str(tmp_path / "out"), 1000)
    with pytest.raises(NeoError, match=r"--vocab_size 100: a byte-level BPE needs at least 258"):
        train_tokenizer(str(tmp_path / "in"), str(tmp_path / "out"), 100)


def test_wikitext_detokenizer_and_ftfy():
    from neo.data.prep.cleaning import fix_text, wikitext_detokenize

    assert wikitext_detokenize(" = = Career = = \n He scored 1 @,@ 000 runs @-@ a record ( he said ) .") == \
        " == Career ==\nHe scored 1,000 runs-a record (he said) ."
    assert fix_text("cafÃ©") == "café"


def test_from_a_folder_of_text_to_training(tmp_path):
    """The docs' walkthrough: create_tfrecords (byte tokens, chunks of n_ctx) -> main.py trains on them."""
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    make = subprocess.run([sys.executable, str(ROOT / "data" / "create_tfrecords.py"), "--input_dir",
                           str(ROOT / "data" / "tinyshakespeare.txt"), "--output_dir", str(tmp_path / "tf"),
                           "--name", "shakespeare", "--encoder_path", "bytes", "--separator", "0",
                           "--mode", "chunks", "--chunk_size", "64", "--write_dataset_config", "--processes", "1", "--no_progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert make.returncode == 0, make.stderr
    assert "wrote 17,159 chunks records" in make.stdout  # 1,115,394 bytes + separator = 17,159 x 65 + 60
    dataset = tmp_path / "tf" / "shakespeare.json"
    train = subprocess.run([sys.executable, str(ROOT / "main.py"), "--model", "tiny", "--set", "train_steps=6",
                            "--set", f"model_path={json.dumps(str(tmp_path / 'run'))}",
                            "--set", f"datasets={json.dumps([[str(dataset), None, 'chunks', None]])}"],
                           capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert "step 6/6 | loss" in train.stdout
    for run in make, train:  # TensorFlow, only reading records, says nothing (its oneDNN notice)
        assert "oneDNN" not in run.stderr + run.stdout, run.stderr


def test_jsonl_keys_and_append_eod_as_gpt_neox_preprocesses(tmp_path, capsys):
    """GPT-NeoX's preprocess_data.py flags: every --jsonl-keys field of a record is a document,
    --append-eod ends each with the tokenizer's end of document; the progress bar shows documents,
    tokens and MB/s."""
    import zstandard
    from tokenizers import Tokenizer

    from neo.data.prep.create_tfrecords import main

    src = tmp_path / "in"
    src.mkdir()
    rows = [{"title": "A title", "text": "Its body, longer."}, {"title": "Only a title"}, {"text": "no title"}]
    (src / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(r) + "\n" for r in rows).encode()))
    tok_path = ROOT / "data" / TOKENIZER
    argv = ["--input_dir", str(src), "--output_dir", str(tmp_path / "out"), "--name", "t", "--encoder_path",
            str(tok_path), "--mode", "documents", "--minimum_size", "1", "--processes", "1",
            "--jsonl-keys", "title", "text", "--append-eod"]
    assert main(argv) == 0
    tok = Tokenizer.from_file(str(tok_path))
    eod = tok.token_to_id("<|endoftext|>")
    docs = ["A title", "Its body, longer.", "Only a title", "no title"]
    assert records_of(tmp_path / "out") == [tok.encode(d, add_special_tokens=False).ids + [eod] for d in docs]
    captured = capsys.readouterr()
    assert "line 2: no 'text' string" in captured.err and "line 3: no 'title' string" in captured.err
    bar = captured.err.strip().splitlines()[-1]
    tokens = sum(len(tok.encode(d, add_special_tokens=False).ids) + 1 for d in docs)
    assert "4 documents" in bar and f"{tokens} tokens" in bar and "B/s" in bar, bar
    assert "wrote 4 documents records" in captured.out


def test_append_eod_needs_an_end_of_document_token(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("hello")
    with pytest.raises(NeoError, match=r"--append-eod: tokenizer bytes has no <\|endoftext\|> token"):
        create(tmp_path, tmp_path / "in", encoder_path="bytes", append_eod=True)
    with pytest.raises(NeoError, match=r"--append-eod appends the end-of-document token 0, --separator asks for 5"):
        create(tmp_path, tmp_path / "in", encoder_path=str(ROOT / "data" / TOKENIZER), append_eod=True, separator=5)
    with pytest.raises(NeoError, match=r"--jsonl_keys: name at least one field"):
        create(tmp_path, tmp_path / "in", encoder_path="bytes", separator=0, jsonl_keys=())
