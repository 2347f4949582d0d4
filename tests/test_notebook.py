"""colab/finetune.ipynb runs top to bottom: import a (tiny, random) GPT-Neo from a Hugging Face
folder, make tfrecords from real text, finetune, sample, export, reload in transformers."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "colab" / "finetune.ipynb"


def tiny_gpt_neo(folder: Path, gpt2: Path) -> None:
    """A random GPT-Neo with the real GPT-2 tokenizer, saved as the hub would serve it."""
    torch.manual_seed(0)
    cfg = transformers.GPTNeoConfig(vocab_size=50257, max_position_embeddings=64, hidden_size=32, num_layers=2,
                                    num_heads=4, attention_types=[[["global", "local"], 1]], window_size=16)
    transformers.GPTNeoForCausalLM(cfg).save_pretrained(folder)
    shutil.copyfile(gpt2 / "encoder.json", folder / "vocab.json")
    shutil.copyfile(gpt2 / "vocab.bpe", folder / "merges.txt")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "model_max_length": 64}))


def test_finetune_notebook_runs_end_to_end(tmp_path, data_dir, monkeypatch):
    tiny_gpt_neo(tmp_path / "hf", data_dir / "gpt2")
    text = (data_dir / "tinyshakespeare.txt").read_text()[:40_000]
    (tmp_path / "text.txt").write_text(text)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    params = dict(MODEL=str(tmp_path / "hf"), TEXT=str(tmp_path / "text.txt"), WORK_DIR=str(tmp_path / "work"),
                  TRAIN_STEPS=4, BATCH_SIZE=2, STEPS_PER_CHECKPOINT=2, WARMUP_STEPS=1, LR=1e-3,
                  PRECISION="float32", RECOMPUTE_GRAD=False, MAX_NEW_TOKENS=8, NUM_SAMPLES=1, PROMPT="ROMEO:")
    injected = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    monkeypatch.setenv("XLA_FLAGS", "")  # the notebook's commands see this machine's one CPU device
    monkeypatch.setenv("NEO_DIR", str(ROOT))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    work = tmp_path / "work"
    assert "step 4/4 | loss" in outputs
    assert sorted(p.name for p in (work / "model" / "checkpoints").iterdir()) == ["0", "2", "4"]
    predictions = (work / "model" / "predictions_nosacred_4.txt").read_text()
    assert predictions.startswith("=" * 40 + " SAMPLE 0 ") and "ROMEO:" in predictions
    assert "GPTNeoForCausalLM greedy: ROMEO:" in outputs
    original = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    finetuned = transformers.AutoModelForCausalLM.from_pretrained(work / "hf_export").state_dict()
    moved = [k for k in original if not np.array_equal(original[k].numpy(), finetuned[k].numpy())]
    assert "transformer.h.0.mlp.c_fc.weight" in moved  # the export holds the finetuned weights
