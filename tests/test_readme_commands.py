"""Every shell command of GPT-Neo's README (and the tool lines of its Colab notebook), run as
written with its placeholders filled in, offline on a CPU. Where a command needs what this
machine has not (a TPU, GPUs, a GCS bucket, the network), the part that runs here is tested and
the test says what is left out:

    1  git clone / cd / pip3 install -r requirements.txt   clone this repository; pip resolves
                                                           every requirement from what is installed
    2  main.py --predict --prompt P --tpu T --model C      --tpu off a TPU VM: refused with the launch
                                                           command; without it, samples on the CPU
    3  main.py --predict ... --gpu_ids <device:GPU:0 ...>  no GPUs here: refused, the ids parsed
    4  data/train_tokenizer.py ... --vocab_size 50257       as written
    5  wget .../bundestag_0.tfrecords                       no network: a local stand-in file of the
    6  gsutil cp bundestag_0.tfrecords gs://...             same name, made by command 7, is used
    7  create_tfrecords.py --mode documents ... --use_gpt2_tokenizer --minimum_size <min>
                                                           as written, from data/ (where the script is)
    8  main.py --model C --steps_per_checkpoint N --tpu T   --tpu refused off a TPU VM; trains on the
                                                           README's [train_glob, eval_glob, stitch,
                                                           "random_sample", weight] dataset entry
    9  main.py ... --gpu_ids <device:GPU:0 device:GPU:1>   refused, no GPUs here
    10 python main --model C --check_dataset                the README's `python main` is a typo for
                                                           main.py (docs/differences.md)
    Colab: create_tfrecords.py --input_dir .. --name .. --files_per 1000 --output_dir ..
           --write_dataset_config --processes 1 [--wikitext-detokenize]   as written
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def run(command: str, cwd: Path = ROOT, root: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """A README command line (python3/python replaced by this interpreter), run in `cwd`: by
    default the repository, where the README's user is after `cd GPTNeo`."""
    args = command.split()
    assert args[0] in ("python", "python3"), command
    env = {**ENV, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def speeches(folder: Path, n: int = 40, start: int = 0) -> list[str]:
    """Shakespeare speeches as .txt files (one document per file, as the README's input)."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = (ROOT / "data" / "tinyshakespeare.txt").read_text().split("\n\n")[start:start + n]
    for i, text in enumerate(texts):
        (folder / f"speech_{i:03d}.txt").write_text(text)
    return texts


def test_1_setup_clone_install_and_run_with_nothing_beside_the_clone(tmp_path):
    """`git clone`, `cd`, `pip3 install -r requirements.txt`: the clone (of this repository; the
    README's URL needs the network) resolves every requirement from what is installed, and its
    commands run with nothing beside it: the tokenizers and text they read are in its data/."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "GPTNeo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=300)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-r", "requirements.txt"],
                         cwd=clone, capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    train = run(f"python main.py --model tiny --set train_steps=2 --set model_path=\"{tmp_path / 'run'}\"",
                cwd=clone, root=clone)
    assert train.returncode == 0, train.stderr
    assert "step 2/20" not in train.stdout and "step 2/2 | loss" in train.stdout
    speeches(tmp_path / "txt", n=5)
    make = run(f"python data/create_tfrecords.py --input_dir {tmp_path / 'txt'} --output_dir {tmp_path / 'tf'} "
               f"--use_gpt2_tokenizer --minimum_size 1 --processes 1", cwd=clone, root=clone)
    assert make.returncode == 0, make.stderr


def test_the_repository_reads_nothing_outside_itself():
    """No tracked file points at ../shared (where this project's data was kept before data/)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "neo", "tests", "scripts", "data", "colab", "main.py", "README.md",
                            "docs"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = [f for f in files if f.endswith((".py", ".md", ".ipynb", ".sh", ".sbatch"))
                 and ("../shared" in (ROOT / f).read_text() or '"shared" / "data"' in (ROOT / f).read_text())
                 and f != "tests/test_readme_commands.py"]
    assert not offenders


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A config file (<config_name>) with its model_path, trained for a few steps: commands 2, 3, 10."""
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = {**json.loads((ROOT / "configs" / "tiny.json").read_text()), "model_path": str(tmp / "run"),
           "train_steps": 4}
    (tmp / "my_model.json").write_text(json.dumps(cfg))
    out = run(f"python main.py --model {tmp / 'my_model.json'} --steps_per_checkpoint 4")
    assert out.returncode == 0, out.stderr
    (tmp / "example_prompt.txt").write_text("ROMEO:\n")
    return tmp


def test_2_predict_with_a_tpu_name_off_a_tpu_vm_says_how_to_launch_and_samples_without_it(trained):
    command = (f"python3 main.py --predict --prompt {trained / 'example_prompt.txt'} --tpu my-tpu "
               f"--model {trained / 'my_model.json'}")
    out = run(command)
    assert out.returncode == 2 and "not a Cloud TPU VM" in out.stderr and "scripts/tpu_run.sh my-tpu" in out.stderr
    out = run(command.replace(" --tpu my-tpu", ""))
    assert out.returncode == 0, out.stderr
    written = list((trained / "run").glob("predictions_nosacred_4.txt"))
    assert written and "ROMEO:" in written[0].read_text()


def test_3_and_9_gpu_ids_in_the_readmes_form_parse_and_are_refused_without_gpus(trained):
    for command in (f"python3 main.py --predict --prompt {trained / 'example_prompt.txt'} "
                    f"--gpu_ids device:GPU:0 device:GPU:1 --model {trained / 'my_model.json'}",
                    f"python3 main.py --model {trained / 'my_model.json'} --steps_per_checkpoint 2 "
                    f"--gpu_ids device:GPU:0 device:GPU:1"):
        out = run(command)
        assert out.returncode == 2 and "--gpu_ids 0 1 given, but JAX sees no GPUs" in out.stderr, out.stderr


def test_4_train_tokenizer_as_written(tmp_path):
    speeches(tmp_path / "path" / "to" / "your" / "txt" / "files", n=300)
    out = run("python data/train_tokenizer.py --base_dir ./path/to/your/txt/files --output_dir ./output/path "
              f"--file_type txt --vocab_size 50257".replace("data/", f"{ROOT}/data/"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "tokenizer saved at ./output/path/byte-level-bpe.tokenizer.json" in out.stdout
    assert (tmp_path / "output" / "path" / "byte-level-bpe.tokenizer.json").exists()


@pytest.fixture(scope="module")
def bundestag(tmp_path_factory):
    """Command 7 as written: `python3 create_tfrecords.py` from data/, where the script is.
    Its output, bundestag_0_<n>.tfrecords, stands in for the README's downloaded bundestag_0.tfrecords."""
    tmp = tmp_path_factory.mktemp("bundestag")
    texts = speeches(tmp / "base", n=60)
    command = (f"python3 create_tfrecords.py --mode documents --input_dir {tmp / 'base'} --name bundestag "
               f"--output_dir {tmp / 'output'} --use_gpt2_tokenizer --minimum_size 20 ")
    out = run(command, cwd=ROOT / "data")
    assert out.returncode == 0, out.stderr
    return tmp, texts, out


def test_7_create_tfrecords_as_written_writes_gpt2_documents(bundestag):
    from neo.data.tfrecords import read_records
    from neo.data.tokenizer import load_tokenizer

    tmp, texts, out = bundestag
    (file,) = (tmp / "output").glob("bundestag_*.tfrecords")
    records = [r.tolist() for r in read_records(str(file))]
    gpt2 = load_tokenizer("gpt2")
    # document mode (one record per .txt file, in file order), GPT-2 tokens, separator 50256,
    # documents under --minimum_size 20 tokens dropped
    expected = [ids + [50256] for ids in map(gpt2.encode, texts) if len(ids) >= 20]
    assert records == expected and len(expected) < len(texts)
    assert "documents records" in out.stdout


def test_8_train_on_the_readmes_dataset_entry(bundestag, tmp_path):
    """The README's parameter reference entry [["bundestag_*.tfrecords", "", 10, "random_sample", 1.0]]
    (train glob, eval glob, stitch, sampling mode, weight): the glob is found beside the config."""
    data, _, _ = bundestag
    for f in (data / "output").glob("*.tfrecords"):
        shutil.copy(f, tmp_path)
    cfg = {"n_head": 4, "n_vocab": 50257, "n_embd": 32, "n_layer": 2, "n_ctx": 64, "train_batch_size": 8,
           "attention_types": [[["global", "local"], 1]], "local_attention_radius": 16, "lr": 1e-3,
           "train_steps": 4, "iterations": 2, "eos_id": 50256, "padding_id": 50257,
           "datasets": [["bundestag_*.tfrecords", "", 10, "random_sample", 1.0]], "model_path": str(tmp_path / "run")}
    (tmp_path / "my_config.json").write_text(json.dumps(cfg))
    command = f"python3 main.py --model {tmp_path / 'my_config.json'} --steps_per_checkpoint 2 --tpu my-tpu"
    out = run(command)
    assert out.returncode == 2 and "not a Cloud TPU VM" in out.stderr
    out = run(command.replace(" --tpu my-tpu", ""))
    assert out.returncode == 0, out.stderr
    assert "step 4/4 | loss" in out.stdout
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()} >= {"2", "4"}


def test_10_check_dataset(bundestag, tmp_path):
    data, _, _ = bundestag
    cfg = {"n_head": 4, "n_vocab": 50257, "n_embd": 32, "n_layer": 1, "n_ctx": 64,
           "attention_types": [[["global"], 1]], "tokenizer_path": "gpt2", "eos_id": 50256,
           "datasets": [[str(data / "output" / "bundestag_*.tfrecords"), "", 10, "random_sample", 1.0]]}
    (tmp_path / "config_name.json").write_text(json.dumps(cfg))
    out = run(f"python main.py --model {tmp_path / 'config_name.json'} --check_dataset")
    assert out.returncode == 0, out.stderr
    assert "sampling documents_random, stitch 10" in out.stdout and "(dataset n_vocab 50,257, model n_vocab 50,257): ok" in out.stdout
    assert "--- training example 1 of the first batch" in out.stdout


@pytest.mark.parametrize("extra", ["", " --wikitext-detokenize"])
def test_colab_create_tfrecords_lines_as_written(extra, tmp_path):
    from neo.config import load_model_config

    speeches(tmp_path / "content" / "GPTNeo" / "mydata", n=30)
    command = (f"python data/create_tfrecords.py --input_dir {tmp_path / 'content' / 'GPTNeo' / 'mydata'} "
               f"--name mydata --files_per 1000 --output_dir mydata_tokenized --write_dataset_config --processes 1"
               + extra).replace("data/create_tfrecords.py", str(ROOT / "data" / "create_tfrecords.py"))
    out = run(command, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    written = json.loads((tmp_path / "mydata_tokenized" / "mydata.json").read_text())
    assert (written["n_vocab"], written["eos_id"], written["tokenizer_path"]) == (50257, 50256, "gpt2")
    model = {**json.loads((ROOT / "configs" / "tiny.json").read_text()), "n_vocab": 50257,
             "datasets": [[str(tmp_path / "mydata_tokenized" / "mydata.json"), 4, "documents_random", None]]}
    (tmp_path / "m.json").write_text(json.dumps(model))
    assert load_model_config(str(tmp_path / "m.json")).data.datasets[0].config.n_vocab == 50257
    # the notebook then trains `--model colab_XL`, a name it never wrote (its cell writes GPT3_XL.json)
    out = run("python3 main.py --model colab_XL --steps_per_checkpoint 500 --tpu colab")
    assert out.returncode == 2 and "no config named 'colab_XL'" in out.stderr and "Traceback" not in out.stderr
