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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
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
        return nbytes(self.dtype, self.shape)


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def nbytes(dtype: torch.dtype, shape) -> int:
    return dtype.itemsize * numel(shape)


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
        raise _write_error(path, e) from None
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if "No space left" in str(e):
            raise CheckpointError(f"{path}: disk full while writing the shard") from None
        raise


class ShardWriter:
    """Write one shard tensor by tensor, in the bytes ``write_shard`` (safetensors' ``save_file``) would write.

    The header is known before any data (names, dtypes and shapes are planned), so each tensor goes to its
    offset as soon as it exists and its memory can be reused for the next one: a converter holds one tensor,
    not the whole output shard (on a 1 GB shard: ~1 GB less peak RSS, and ~250K fewer page faults).

    Layout, as safetensors writes it: 8-byte little-endian header length; the header, compact JSON with
    ``__metadata__`` first and then the tensors in data order, padded with spaces to a multiple of 8; the data,
    sorted by dtype then name. The order is safetensors' own, read back from a header it serializes for empty
    stand-ins of the same names and dtypes, so it follows the installed version.

    ``queue`` > 0 writes from a background thread, up to that many tensors behind the caller, so the next tensor
    is computed while the last one is copied into the page cache (pwrite releases the GIL); the tensors waiting
    stay referenced until written.

    Use as a context manager: on a clean exit every planned tensor must have been written, and the file is
    renamed into place (``<name>.tmp`` until then); on an error the temp file is removed.
    """

    def __init__(
        self,
        path: Path,
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict | None = None,
        queue: int = 0,
    ):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._fd: int | None = None
        self._queue = queue
        self._pool = None
        self._futures: deque = deque()
        self._pending = {name for name, _, _ in specs}
        if len(self._pending) != len(specs):
            raise ValueError(f"{self.path}: a tensor name is planned twice")
        self._specs = {name: (dtype, tuple(shape)) for name, dtype, shape in specs}
        self._offsets, self._header = _shard_layout(specs, {"format": "pt"} if metadata is None else metadata)

    def __enter__(self) -> "ShardWriter":
        try:
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._pwrite(self._header, 0)
        except OSError as e:
            self._abort()
            raise _write_error(self.path, e) from None
        if self._queue > 0:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (CPU; its dtype and shape must be the planned ones)."""
        if name not in self._specs:
            raise ValueError(f"{self.path}: tensor {name} is not planned for this shard")
        if name not in self._pending:
            raise ValueError(f"{self.path}: tensor {name} written twice")
        dtype, shape = self._specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name} is {tensor.dtype}{tuple(tensor.shape)}, planned {dtype}{shape}")
        begin, end = self._offsets[name]
        if end > begin:
            data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            try:
                if self._pool is None:
                    self._pwrite(data, begin)
                else:
                    self._futures.append(self._pool.submit(self._pwrite, data, begin))
                    while len(self._futures) > self._queue:
                        self._futures.popleft().result()
            except OSError as e:
                raise _write_error(self.path, e) from None
        self._pending.discard(name)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            while self._futures:
                self._futures.popleft().result()
        except OSError as e:
            self._abort()
            raise _write_error(self.path, e) from None
        if self._pending:
            self._abort()
            missing = sorted(self._pending)
            raise ValueError(f"{self.path}: {len(missing)} planned tensors were never written, e.g. {missing[0]}")
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            os.close(self._fd)
            self._fd = None
            os.replace(self.tmp, self.path)
        except OSError as e:
            self._abort()
            raise _write_error(self.path, e) from None

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:  # one pwrite moves at most ~2 GiB on Linux
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def _abort(self) -> None:
        if self._pool is not None:  # let queued writes finish (or fail) before their file goes
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._futures.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp.unlink(missing_ok=True)


def _shard_layout(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict) -> tuple[dict[str, tuple[int, int]], bytes]:
    """Absolute file offsets of each tensor's data, and the header bytes (length prefix included)."""
    from safetensors.torch import save

    for name, dtype, _ in specs:
        if dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {name}: dtype {dtype} cannot be written; expected one of {', '.join(DTYPES)}")
    stand_ins = save({name: torch.empty(0, dtype=dtype) for name, dtype, _ in specs}, metadata=metadata)
    (n,) = struct.unpack("<Q", stand_ins[:8])
    order = [k for k in json.loads(stand_ins[8 : 8 + n]) if k != "__metadata__"]
    info = {name: (dtype, tuple(shape)) for name, dtype, shape in specs}
    header: dict = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for name in order:
        dtype, shape = info[name]
        size = TensorInfo(name, dtype, shape, "").nbytes
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + size]}
        pos += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    offsets = {name: (start + e["data_offsets"][0], start + e["data_offsets"][1]) for name, e in header.items() if name != "__metadata__"}
    return offsets, struct.pack("<Q", len(raw)) + raw


def _write_error(path: Path, e: OSError) -> CheckpointError:
    if e.errno == errno.ENOSPC:
        return CheckpointError(f"{path}: disk full while writing the shard")
    return CheckpointError(f"{path}: cannot write the shard ({e.strerror or e})")


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
