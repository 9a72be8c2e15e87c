"""Is a Hugging Face checkpoint folder still loadable? Checked from the files alone (no torch):
``config.json`` parses and names a ``model_type``; the weights are present and whole
(safetensors headers parse and the files are as long as their headers say; sharded indexes
point at shards that exist; ``pytorch_model.bin`` is non-empty); a tokenizer is present
(``tokenizer.json`` parses, or a vocab file exists) with a parseable ``tokenizer_config.json``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from registry import RegistryError


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a JSON object")
    return data


def _check_safetensors(path: Path) -> None:
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} beyond the file end")
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError, struct.error) as exc:
        raise RegistryError(f"{path}: not a valid safetensors file ({exc})") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if ends and 8 + header_len + max(ends) > size:
        raise RegistryError(f"{path}: truncated ({size} bytes, header needs {8 + header_len + max(ends)})")


def _check_weights(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            shards = sorted(set(_json(index).get("weight_map", {}).values()))
            if not shards:
                raise RegistryError(f"{index}: empty weight_map")
            for shard in shards:
                if not (folder / shard).is_file():
                    raise RegistryError(f"{index}: shard {shard} is missing")
            return [folder / s for s in shards]
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    for name in ("pytorch_model.bin", "adapter_model.bin"):
        path = folder / name
        if path.is_file():
            if path.stat().st_size == 0:
                raise RegistryError(f"{path}: empty")
            return [path]
    raise RegistryError(f"{folder}: no weights (model.safetensors, a sharded index or pytorch_model.bin)")


def check_loadable(folder: str | Path) -> dict:
    """Raise RegistryError naming the first bad file; return a small summary when loadable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RegistryError(f"checkpoint folder {folder} does not exist")
    config = _json(folder / "config.json")
    if "model_type" not in config and not (folder / "adapter_config.json").exists():
        raise RegistryError(f"{folder / 'config.json'}: no model_type")
    weights = _check_weights(folder)
    for path in weights:
        if path.suffix == ".safetensors":
            _check_safetensors(path)
    if (folder / "tokenizer.json").exists():
        _json(folder / "tokenizer.json")
    elif not any((folder / n).exists() for n in ("tokenizer.model", "vocab.json", "spiece.model")):
        raise RegistryError(f"{folder}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    _json(folder / "tokenizer_config.json")
    return {"path": str(folder), "model_type": config.get("model_type"), "weights": [p.name for p in weights]}
