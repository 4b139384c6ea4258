"""Safetensors shards, the shard index and config.json: reading lazily, writing atomically.

A checkpoint is a Hugging Face model directory (FORMATS.md): ``config.json``, one or more ``*.safetensors``
shards and, with more than one shard, ``model.safetensors.index.json`` mapping every tensor to its shard.
Tensors are read one at a time through the index (a weight's scale may live in another shard), so nothing
ever holds a whole model.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# safetensors dtype codes -> torch dtypes ingot understands. Anything else is refused with the tensor's name.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """Bad input on disk: the message names the file or tensor and what was expected."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: str  # file name inside the checkpoint directory

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header (8-byte little-endian length + JSON) and validate it against the file size.

    Costs one small read however large the shard: this is how a 690 GB checkpoint is planned in seconds.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {hlen} bytes, file has {size})")
            header = json.loads(f.read(hlen))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    infos, end = {}, 0
    for name, entry in header.items():
        code = entry.get("dtype")
        if code not in DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name} has dtype {code}; expected one of {', '.join(DTYPES)}"
            )
        info = TensorInfo(name, DTYPES[code], tuple(entry["shape"]), path.name)
        begin, stop = entry["data_offsets"]
        if stop - begin != info.nbytes:
            raise CheckpointError(f"{path}: tensor {name} occupies {stop - begin} bytes, its shape needs {info.nbytes}")
        infos[name] = info
        end = max(end, stop)
    if 8 + hlen + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, header says tensors end at {8 + hlen + end})"
        )
    return infos


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object")
    return data


class Checkpoint:
    """A model directory opened for lazy, tensor-at-a-time reading.

    ``path`` is the directory or its ``model.safetensors.index.json``. Only headers are read on open.
    """

    def __init__(self, path: Path | str):
        path = Path(path)
        self.dir = path.parent if path.is_file() else path
        if not self.dir.is_dir():
            raise CheckpointError(f"{path}: not a model directory")
        self.config = read_json(self.dir / CONFIG_NAME, "config.json")
        index_path = path if path.is_file() and path.name.endswith(".json") else self.dir / INDEX_NAME
        if index_path.exists():
            index = read_json(index_path, "shard index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: expected a non-empty 'weight_map' object")
            shards = list(dict.fromkeys(weight_map.values()))
        elif (self.dir / SINGLE_NAME).exists():
            weight_map, shards = None, [SINGLE_NAME]
        else:
            raise CheckpointError(f"{self.dir}: no {INDEX_NAME} and no {SINGLE_NAME}")
        self.shards: list[str] = shards
        self.tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            for name, info in read_header(self.dir / shard).items():
                if weight_map is not None and weight_map.get(name) != shard:
                    continue  # the index is authoritative; a stray duplicate is ignored
                self.tensors[name] = info
        if weight_map is not None:
            missing = [n for n in weight_map if n not in self.tensors]
            if missing:
                raise CheckpointError(
                    f"{self.dir / weight_map[missing[0]]}: tensor {missing[0]} listed in the index is not in the shard"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
        self._handles: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (from whichever shard the index names)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.dir}: tensor {name} is not in the checkpoint")
        handle = self._handles.get(info.shard)
        if handle is None:
            try:
                handle = safe_open(str(self.dir / info.shard), framework="pt")
            except Exception as e:  # safetensors raises its own error type for corrupt files
                raise CheckpointError(f"{self.dir / info.shard}: cannot open ({e})") from None
            self._handles[info.shard] = handle
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.dir / info.shard}: cannot read tensor {name} ({e})") from None

    def close(self) -> None:
        """Drop open shard handles (and with them their memory maps)."""
        self._handles.clear()


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write one shard atomically: to ``<name>.tmp``, then rename. A disk-full error names the file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"{path}: disk full while writing the shard") from None
        raise CheckpointError(f"{path}: cannot write the shard ({e.strerror or e})") from None
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if "No space left" in str(e):
            raise CheckpointError(f"{path}: disk full while writing the shard") from None
        raise


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp name, rename); sorted keys and a trailing newline for stable bytes."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"{path}: disk full") from None
        raise CheckpointError(f"{path}: cannot write ({e.strerror or e})") from None


def shard_name(i: int, n: int) -> str:
    """HF shard naming: model-00001-of-00003.safetensors (1-based)."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"
