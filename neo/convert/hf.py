"""Hugging Face model folders <-> neo checkpoints (`scripts/convert_hf.py`).

Import reads `config.json` and the weights (safetensors, or PyTorch files through torch's
weights-only loader: nothing is ever unpickled as code), converts them with the family's
table (gpt_neo.py / gpt_neox.py / llama.py), writes a parameters-only checkpoint into the output folder
and a neo model config `config.json` beside it whose `model_path` is that folder, and copies the
tokenizer files. Export reads a neo checkpoint and writes what
`AutoModelForCausalLM.from_pretrained` loads. Neither direction needs torch or transformers
for safetensors files.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from neo.convert import gpt_neo, gpt_neox, llama
from neo.errors import NeoError

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")
ARCHITECTURES = {"gpt_neo": "GPTNeoForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", **llama.ARCHITECTURES}
MAX_SHARD_BYTES = 5 * 1024 ** 3  # transformers' own default shard size

# ----------------------------------------------------------------------------------------------
# Reading weights


def _safetensors_dtypes() -> dict[str, Any]:
    import ml_dtypes

    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A .safetensors file as memory-mapped numpy arrays (bfloat16 included, which
    safetensors' own numpy loader refuses). The format is an 8-byte header length, a JSON
    header of {name: {dtype, shape, data_offsets}}, then raw little-endian bytes."""
    dtypes = _safetensors_dtypes()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise NeoError(f"{path}: tensor {name} has dtype {info['dtype']}, which neo cannot read.")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def read_torch_file(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch state-dict file through `torch.load(weights_only=True)`: tensors only, no
    arbitrary code is unpickled."""
    try:
        import torch
    except ImportError:
        raise NeoError(f"{path} is a PyTorch file and reading it needs torch (pip install torch), or give "
                       f"a folder with .safetensors weights.") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unsafe pickle or a corrupt file: never fall back to full unpickling
        raise NeoError(f"{path}: not a plain PyTorch state dict ({type(e).__name__}: {str(e)[:200]}). "
                       f"neo only loads weights-only files; convert it to safetensors.") from None
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in sd.items()}


def read_hf_weights(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of an HF model folder, preferring safetensors, following shard indexes."""
    for single, index, reader in (("model.safetensors", "model.safetensors.index.json", read_safetensors),
                                  ("pytorch_model.bin", "pytorch_model.bin.index.json", read_torch_file)):
        if (folder / single).exists():
            return reader(folder / single)
        if (folder / index).exists():
            files = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            sd: dict[str, np.ndarray] = {}
            for name in files:
                sd.update(reader(folder / name))
            return sd
    raise NeoError(f"{folder} has no model.safetensors or pytorch_model.bin (nor a sharded index of them).")


def resolve_hf_input(name_or_dir: str, revision: Optional[str] = None) -> Path:
    """A local HF folder as is; otherwise a hub id ("EleutherAI/pythia-70m") is downloaded."""
    p = Path(name_or_dir)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise NeoError(f"{p} has no config.json; is it a Hugging Face model folder?")
        return p
    if p.exists() or name_or_dir.count("/") != 1:
        raise NeoError(f"--input {name_or_dir}: not a folder, and not a hub id like EleutherAI/gpt-neo-125M.")
    try:
        from huggingface_hub import snapshot_download

        meta = ["*.json", "*.txt"]
        path = Path(snapshot_download(name_or_dir, revision=revision, allow_patterns=meta + ["*.safetensors"]))
        if not list(path.glob("*.safetensors")):
            path = Path(snapshot_download(name_or_dir, revision=revision, allow_patterns=meta + ["*.bin"]))
    except Exception as e:  # offline, unknown repo, gated repo: the hub's own message says which
        raise NeoError(f"cannot download {name_or_dir!r} from the Hugging Face hub ({type(e).__name__}: "
                       f"{str(e)[:200]}). Offline? Download the folder elsewhere and pass its path.") from None
    return path


# ----------------------------------------------------------------------------------------------
# Import


def model_type(hf_cfg: Mapping[str, Any], where: str) -> str:
    kind = hf_cfg.get("model_type")
    if kind not in ARCHITECTURES:
        archs = hf_cfg.get("architectures")
        raise NeoError(f"{where}: model_type {kind!r} ({archs}) is not one neo converts: "
                       f"{', '.join(ARCHITECTURES.values())}.")
    return kind


def hf_to_neo(hf_cfg: Mapping[str, Any], sd: Mapping[str, np.ndarray], where: str = "<hf>"):
    """(neo config dict, Config, params) for an HF config and state dict of any family."""
    from neo.config import parse_model_config
    from neo.model import as_model_tree

    kind = model_type(hf_cfg, where)
    if kind == "gpt_neo":
        raw = gpt_neo.config_from_hf(hf_cfg)
        cfg = parse_model_config(raw, where)
        params = gpt_neo.params_from_hf(sd, cfg.model.n_layer, cfg.model.n_head)
    else:
        table = gpt_neox if kind == "gpt_neox" else llama
        raw = table.config_from_hf(hf_cfg)
        cfg = parse_model_config(raw, where)
        params = table.params_from_hf(sd, cfg.model)
    return raw, cfg, as_model_tree(cfg.model, params)


def _check_shapes(cfg, params: Any, where: str) -> None:
    """The converted tree must be exactly the tree the model builds for this config."""
    import jax

    from neo.model import abstract_init

    want = jax.tree.map(lambda x: tuple(getattr(x, "value", x).shape), abstract_init(cfg.model),
                        is_leaf=lambda x: hasattr(x, "value"))
    got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        flat_w = dict(jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda x: isinstance(x, tuple))[0])
        flat_g = dict(jax.tree_util.tree_flatten_with_path(got, is_leaf=lambda x: isinstance(x, tuple))[0])
        diff = [f"{jax.tree_util.keystr(k)}: {flat_g.get(k)} vs {flat_w.get(k)}"
                for k in set(flat_w) | set(flat_g) if flat_w.get(k) != flat_g.get(k)]
        raise NeoError(f"{where}: the weights do not fit the model its config.json describes "
                       f"(weights vs model): {'; '.join(sorted(diff)[:5])}.")


def import_hf(name_or_dir: str, output: str, revision: Optional[str] = None, log=print) -> Path:
    """Convert an HF GPT-Neo/GPT-NeoX/LLaMA/Mistral folder (or hub id) into `output`: a neo checkpoint in
    output/checkpoints/0 and a neo config output/config.json. Returns the config's path."""
    import jax

    from neo.checkpoint import checkpoint_dir, save_params

    src = resolve_hf_input(name_or_dir, revision)
    out = Path(output).resolve()
    if Path(checkpoint_dir(str(out))).exists() and any(Path(checkpoint_dir(str(out))).iterdir()):
        raise NeoError(f"{out} already holds checkpoints; import into an empty folder (nothing was overwritten).")
    hf_cfg = json.loads((src / "config.json").read_text())
    sd = read_hf_weights(src)
    raw, cfg, params = hf_to_neo(hf_cfg, sd, str(src / "config.json"))
    _check_shapes(cfg, params, str(src))
    out.mkdir(parents=True, exist_ok=True)
    copied = [name for name in TOKENIZER_FILES if (src / name).exists()]
    for name in copied:
        shutil.copyfile(src / name, out / name)
    raw = {**raw, "model_path": str(out)}
    if {"tokenizer.json"} <= set(copied) or {"vocab.json", "merges.txt"} <= set(copied):
        raw["tokenizer_path"] = str(out)
    else:
        log(f"neo: {src} has no tokenizer files; set 'tokenizer_path' in {out / 'config.json'} before sampling.")
    save_params(str(out), params, step=0, meta={"imported_from": str(name_or_dir), "revision": revision})
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
    log(f"neo: imported {ARCHITECTURES[model_type(hf_cfg, '')]} ({n:,} parameters) from {name_or_dir} into {out}")
    return out / "config.json"


# ----------------------------------------------------------------------------------------------
# Export


def hf_family(m) -> str:
    """The Hugging Face family a neo model exports as: RMSNorm models as LLaMA (Mistral when
    every layer has a sliding window), other rotary models as GPT-NeoX, the rest as GPT-Neo."""
    if m.norm_kind == "rmsnorm":
        return llama.family(m)
    return "gpt_neox" if m.position_embedding == "rotary" else "gpt_neo"


def neo_to_hf(cfg, params: Mapping[str, Any]) -> tuple[dict, dict[str, np.ndarray]]:
    """(HF config.json dict, HF state dict) for a neo config and parameters, in the family
    `hf_family` chooses."""
    from neo.model import per_layer

    kind = hf_family(cfg.model)
    params = per_layer(params)  # the tables name layers one by one, as Hugging Face does
    if kind == "gpt_neox":
        fields, sd = gpt_neox.config_to_hf(cfg, params), gpt_neox.params_to_hf(params, cfg.model)
    elif kind in llama.ARCHITECTURES:
        fields, sd = llama.config_to_hf(cfg), llama.params_to_hf(params, cfg.model)
    else:
        fields, sd = gpt_neo.config_to_hf(cfg), gpt_neo.params_to_hf(params, cfg.model)
    dtype = str(next(iter(sd.values())).dtype)
    hf_cfg = {"architectures": [ARCHITECTURES[kind]], "model_type": kind, **fields,
              "torch_dtype": dtype, "use_cache": True}
    return hf_cfg, sd


def write_safetensors(sd: Mapping[str, np.ndarray], folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when larger than a shard."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in sd.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in sd.values()))}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tokenizer(cfg, folder: Path, log=print) -> None:
    """Tokenizer files transformers' AutoTokenizer loads, from the config's `tokenizer_path`."""
    from neo.config import resolve_path
    from neo.data.tokenizer import HFTokenizer, load_tokenizer

    if not cfg.data.tokenizer_path:
        log("neo: the config names no tokenizer_path; exported weights only (add tokenizer files by hand).")
        return
    src = Path(resolve_path(cfg.data.tokenizer_path))
    if src.is_dir() and (src / "tokenizer_config.json").exists():  # already a Hugging Face tokenizer
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copyfile(src / name, folder / name)
        return
    tok = load_tokenizer(cfg.data.tokenizer_path)
    if not isinstance(tok, HFTokenizer):
        log(f"neo: tokenizer {cfg.data.tokenizer_path!r} has no Hugging Face form; exported weights only.")
        return
    tok.tok.save(str(folder / "tokenizer.json"))
    eos = tok.tok.id_to_token(cfg.data.eos_id) if cfg.data.eos_id is not None else None
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.model.n_ctx,
               "add_prefix_space": False, "clean_up_tokenization_spaces": False}
    if eos is not None:
        tok_cfg.update(eos_token=eos, bos_token=eos, unk_token=eos)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


def export_hf(cfg, output: str, step: Optional[int] = None, dtype: str = "float32", log=print) -> Path:
    """Write the latest (or given) checkpoint of `cfg` as an HF model folder `output`."""
    import jax

    from neo.checkpoint import load_for_inference
    from neo.mesh import make_layout

    dtypes = {"float32": np.float32, "float16": np.float16, "bfloat16": __import__("ml_dtypes").bfloat16}
    if dtype not in dtypes:
        raise NeoError(f"--dtype {dtype}: choose one of {', '.join(dtypes)}.")
    layout = make_layout("", "", jax.devices("cpu")[:1])  # host memory: export never needs an accelerator
    params, meta = load_for_inference(cfg, layout, step)
    params = jax.tree.map(lambda x: np.asarray(x).astype(dtypes[dtype]), params)
    hf_cfg, sd = neo_to_hf(cfg, params)
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(sd, folder)
    (folder / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    write_tokenizer(cfg, folder, log)
    log(f"neo: exported step {meta.get('step')} of {cfg.run.model_path} as {hf_cfg['architectures'][0]} to {folder}")
    return folder
