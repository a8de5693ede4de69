"""Reading weight files: a lean safetensors reader and the safe fallback for pickled checkpoints.

Why our own safetensors reader: multi-gigabyte checkpoints must land in the target dtype and
device with one copy and no page-cache pages pinned in our resident set. We parse the header,
check it against the file size (so a truncated or corrupt file fails with one clear line), and
``readinto`` each tensor straight into its final buffer. Pickled files (.pt/.ckpt/.bin) are
only opened with ``torch.load(weights_only=True)``: no arbitrary objects are ever unpickled.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

_DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024


class WeightFileError(ValueError):
    """A weight file that cannot be read: missing, truncated, corrupt or of an unsupported type."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """Header of a safetensors file, validated against the file size; tensors read on demand."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        name = self.path.name
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise WeightFileError(f"{self.path}: file not found") from None
        if size < 8:
            raise WeightFileError(f"{name}: not a safetensors file (only {size} bytes); is the download truncated?")
        with open(self.path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len <= 1 or header_len > _MAX_HEADER or 8 + header_len > size:
                raise WeightFileError(
                    f"{name}: not a valid safetensors file (header length {header_len} does not fit a "
                    f"{size}-byte file); the file is corrupt, truncated or of another format"
                )
            raw = fh.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WeightFileError(f"{name}: corrupt safetensors header (not valid JSON)") from None
        if not isinstance(header, dict):
            raise WeightFileError(f"{name}: corrupt safetensors header (not a JSON object)")
        self.metadata: Dict[str, str] = dict(header.pop("__metadata__", None) or {})
        base = 8 + header_len
        self.tensors: Dict[str, TensorInfo] = {}
        data_end = 0
        for key, entry in header.items():
            try:
                dtype = _DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise WeightFileError(f"{name}: corrupt safetensors header entry for {key!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * _element_size(dtype) or begin < 0:
                raise WeightFileError(f"{name}: corrupt safetensors header: tensor {key!r} has inconsistent size")
            self.tensors[key] = TensorInfo(dtype, shape, base + begin, base + end)
            data_end = max(data_end, end)
        if base + data_end > size:
            missing = base + data_end - size
            raise WeightFileError(
                f"{name}: file is truncated ({size} bytes, {missing} bytes of tensor data missing); "
                "download it again"
            )

    def keys(self):
        return self.tensors.keys()

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}

    def dtypes(self) -> Dict[str, torch.dtype]:
        return {k: v.dtype for k, v in self.tensors.items()}

    def read(
        self,
        keys=None,
        *,
        dtype: Optional[torch.dtype] = None,
        device: torch.device | str = "cpu",
        strip_prefix: str = "",
    ) -> Dict[str, torch.Tensor]:
        """Read tensors (all, or ``keys``), casting floating ones to ``dtype`` and moving to ``device``.

        Each tensor is read once. When neither a cast nor a move is needed it is read straight
        into its result; otherwise it passes through one staging buffer reused for every tensor, so
        peak memory is the results plus the largest staged tensor (fresh temporaries per tensor
        fragment the C heap and can keep several of them resident).
        """
        device = torch.device(device)
        wanted = list(self.tensors) if keys is None else list(keys)

        def staged(info: TensorInfo) -> bool:
            cast = dtype is not None and info.dtype.is_floating_point and info.dtype != dtype
            return cast or device.type != "cpu"

        staging_bytes = max((self.tensors[k].nbytes for k in wanted if staged(self.tensors[k])), default=0)
        staging = torch.empty(staging_bytes, dtype=torch.uint8) if staging_bytes else None
        out: Dict[str, torch.Tensor] = {}
        with open(self.path, "rb", buffering=0) as fh:
            for key in sorted(wanted, key=lambda k: self.tensors[k].start):
                info = self.tensors[key]
                is_staged = staged(info)
                raw = staging[: info.nbytes] if is_staged else torch.empty(info.nbytes, dtype=torch.uint8)
                if info.nbytes:
                    fh.seek(info.start)
                    view = memoryview(raw.numpy())
                    got = 0
                    while got < info.nbytes:
                        n = fh.readinto(view[got:])
                        if not n:
                            raise WeightFileError(f"{self.path.name}: file ended while reading {key!r}")
                        got += n
                tensor = raw.view(info.dtype).view(info.shape)
                if is_staged:  # a copy: the staging buffer is overwritten by the next tensor
                    cast = dtype if info.dtype.is_floating_point and dtype is not None else info.dtype
                    tensor = tensor.to(device=device, dtype=cast, copy=True)
                out_key = key[len(strip_prefix):] if strip_prefix and key.startswith(strip_prefix) else key
                out[out_key] = tensor
        return out


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class WeightSource:
    """Uniform view of a weight file's keys/shapes and tensors, whatever its container format."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        self._pickled: Optional[Dict[str, torch.Tensor]] = None
        self._st: Optional[SafetensorsFile] = None
        if not self.path.exists():
            raise WeightFileError(f"{self.path}: file not found")
        if suffix in PICKLE_SUFFIXES:
            self._pickled = _load_pickled(self.path)
            self.metadata: Dict[str, str] = {}
        else:
            self._st = SafetensorsFile(self.path)
            self.metadata = self._st.metadata

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        if self._st is not None:
            return self._st.shapes()
        return {k: tuple(v.shape) for k, v in self._pickled.items()}

    def dtypes(self) -> Dict[str, torch.dtype]:
        if self._st is not None:
            return self._st.dtypes()
        return {k: v.dtype for k, v in self._pickled.items()}

    def read(self, keys=None, *, dtype=None, device="cpu", strip_prefix: str = "") -> Dict[str, torch.Tensor]:
        if self._st is not None:
            return self._st.read(keys, dtype=dtype, device=device, strip_prefix=strip_prefix)
        wanted = list(self._pickled) if keys is None else list(keys)
        out = {}
        for key in wanted:
            t = self._pickled[key]
            if dtype is not None and t.is_floating_point():
                t = t.to(device=device, dtype=dtype)
            else:
                t = t.to(device=device)
            out[key[len(strip_prefix):] if strip_prefix and key.startswith(strip_prefix) else key] = t
        return out


def _load_pickled(path: Path) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightFileError(
            f"{path.name}: cannot be read safely as a PyTorch checkpoint ({first}). Only plain tensor "
            "checkpoints are accepted; prefer the .safetensors release"
        ) from None
    for container in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(container), dict) and not _is_tensor_dict(obj):
            obj = obj[container]
    if not isinstance(obj, dict):
        raise WeightFileError(f"{path.name}: the checkpoint does not hold a dictionary of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightFileError(f"{path.name}: the checkpoint holds no tensors")
    return tensors


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values())


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: os.PathLike | str, metadata=None) -> None:
    """Write a safetensors file (used by the tiny-model writer and benchmarks)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
