"""Read the tensors of a TorchScript (or ``torch.save``) zip archive without running any of its code.

OpenAI's ``decoder.pt`` (openai/consistencydecoder) is a TorchScript archive whose graph hard-codes
``cuda:0`` (openai/consistencydecoder#15), so ``torch.jit.load`` fails without a GPU. The archive is a
zip holding ``<name>/data.pkl`` (the module tree: ``__torch__.*`` objects whose attributes are tensors),
``<name>/constants.pkl`` (tensor constants of the graph) and ``<name>/data/<key>`` (raw storages).
This reader unpickles ``data.pkl`` with an allow-list: ``__torch__.*`` classes become inert attribute
holders, storages are read from the zip onto the CPU whatever their recorded device, and any other
global raises. Nothing in ``code/`` is compiled or executed.

What an archive can make the reader allocate is bounded before anything is read: every storage member's
declared (uncompressed) size must equal what its tensor needs (numel × element size, from the pickle), all
storages together at most ``MAX_STORAGE_BYTES`` (4 GiB; decoder.pt holds 2.49 GB) and at most
``MAX_EXPANSION`` times the archive's size (torch stores members uncompressed, so a real archive is about
the size of its storages, while a zip bomb expands ~1000×), each pickle at most ``MAX_PICKLE_BYTES``, and
no tensor may view more elements than its storage holds. Storages are streamed from the zip straight into
their tensors (no second copy).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CmkitError

#: SHA-256 of OpenAI's ``decoder.pt``: the second-to-last component of its release URL,
#: https://openaipublic.azureedge.net/diff-vae/c9cebd3132dd9c42936d803e33424145a748843c8f716c0814838bdc8a2fe7cb/decoder.pt
OPENAI_DECODER_SHA256 = "c9cebd3132dd9c42936d803e33424145a748843c8f716c0814838bdc8a2fe7cb"

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_SKIP_ATTRS = {"training", "_is_full_backward_hook"}

#: All storages of one archive together (OpenAI's decoder.pt: 2.49 GB of fp32 weights).
MAX_STORAGE_BYTES = 4 * 2**30
#: Declared storage bytes per byte of archive: torch writes members uncompressed (ratio ≤ 1); float weights
#: re-zipped by hand shrink by less than 2×, a zip bomb by ~1000×.
MAX_EXPANSION = 8
#: ``data.pkl`` / ``constants.pkl`` (the module tree; decoder.pt's is well under 1 MiB).
MAX_PICKLE_BYTES = 64 * 2**20
_CHUNK = 16 * 2**20
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, NotImplementedError)


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise a ``CmkitError`` if the file's SHA-256 is not ``expected``."""
    actual = sha256_of(path)
    if actual != expected.lower():
        raise CmkitError(
            f"{path}: SHA-256 {actual[:16]}… does not match the expected {expected[:16]}… "
            "(OpenAI's decoder.pt release hash); the file is corrupt or not the released decoder "
            "(pass verify=False / --no-verify to load it anyway)"
        )


class ScriptObject:
    """Inert stand-in for a pickled ``__torch__.*`` module: keeps its attributes, runs nothing."""

    qualname = "__torch__"

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_attrs"] = dict(state) if isinstance(state, dict) else {"_state": state}


def _rebuild_tensor(storage: Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> Tensor:
    if math.prod(size) > max(storage.numel(), 1):  # e.g. stride-0 views: tiny file, huge tensor once copied
        raise ValueError(f"a tensor of shape {tuple(size)} views a storage of only {storage.numel()} elements")
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: Tensor, *_: Any) -> Tensor:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Allow-listed unpickler for TorchScript / ``torch.save`` archives; storages are read lazily from the zip."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, storage_dir: str, path: str, budget: list[int]):
        super().__init__(io.BytesIO(data))
        self.archive, self.storage_dir, self.path = archive, storage_dir, path
        self.budget = budget  # [bytes the archive's storages may still declare], shared by data.pkl and constants.pkl
        self.storages: dict[str, Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_") and name.endswith("list"):
            return lambda x: list(x)
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return lambda value, _tag: value
        raise CmkitError(
            f"{self.path}: refusing to load {module}.{name} from the pickle; expected only tensors "
            "and TorchScript modules (a TorchScript decoder.pt or a torch.save'd state dict)"
        )

    def persistent_load(self, pid: Any) -> Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CmkitError(f"{self.path}: unsupported persistent id {pid!r:.60}")
        _, dtype, key, _location, numel = pid[:5]
        if not isinstance(dtype, torch.dtype):
            raise CmkitError(f"{self.path}: unsupported storage type {dtype!r}")
        if key not in self.storages:
            self.storages[key] = self._read_storage(str(key), dtype, numel)
        return self.storages[key]

    def _read_storage(self, key: str, dtype: torch.dtype, numel: Any) -> Tensor:
        """The storage ``key`` as a flat tensor, after checking its declared size (see the module docstring)."""
        try:
            info = self.archive.getinfo(f"{self.storage_dir}{key}")
        except KeyError:
            raise CmkitError(f"{self.path}: storage {key} is missing from the archive") from None
        if not isinstance(numel, int) or numel < 0:
            raise CmkitError(f"{self.path}: storage {key} has an invalid element count {numel!r:.40}")
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if info.file_size < nbytes:
            raise CmkitError(f"{self.path}: storage {key} is truncated ({info.file_size} < {nbytes} bytes)")
        if info.file_size > nbytes:
            raise CmkitError(
                f"{self.path}: storage {key} declares {info.file_size} bytes but its tensor needs "
                f"{nbytes}; refusing a malformed or crafted archive"
            )
        if nbytes > self.budget[0]:
            raise CmkitError(
                f"{self.path}: its storages declare more bytes than the reader allows "
                f"(at most {MAX_EXPANSION}× the file's size and {MAX_STORAGE_BYTES / 2**30:g} GiB in "
                f"all; storage {key} alone declares {nbytes} bytes); refusing a crafted or "
                "re-compressed archive"
            )
        self.budget[0] -= nbytes
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        with self.archive.open(info) as f:
            while done < nbytes:
                chunk = f.read(min(_CHUNK, nbytes - done))
                if not chunk:
                    break
                view[done : done + len(chunk)] = chunk
                done += len(chunk)
            f.read(1)  # reach the end of the member, so that zipfile checks its CRC
        if done < nbytes:
            raise CmkitError(f"{self.path}: storage {key} is truncated ({done} < {nbytes} bytes)")
        return buf.view(dtype)


def _root(archive: zipfile.ZipFile, path: str) -> str:
    """The archive's top folder (``archive/`` for torch.save, the file stem for TorchScript)."""
    for name in archive.namelist():
        if name.endswith("data.pkl") and name.count("/") == 1:
            return name[: -len("data.pkl")]
    raise CmkitError(f"{path}: a zip archive without data.pkl; expected a TorchScript decoder.pt")


def _collect(obj: Any, prefix: str, out: dict[str, Tensor], seen: set[int]) -> None:
    """Flatten a pickled module tree into ``dotted.name → tensor`` (attributes, dicts, lists)."""
    if isinstance(obj, Tensor):
        out[prefix.rstrip(".")] = obj
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, ScriptObject):
        items = obj.__dict__.get("_attrs", {}).items()
    elif isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(obj))
    else:
        return
    for key, value in items:
        if isinstance(key, str) and key not in _SKIP_ATTRS:
            _collect(value, f"{prefix}{key}.", out, seen)


def is_torch_zip(path: str | Path) -> bool:
    """True for a zip archive that contains ``<top>/data.pkl`` (TorchScript or the torch.save zip format)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("data.pkl") and n.count("/") == 1 for n in archive.namelist())


def is_torchscript(path: str | Path) -> bool:
    """A torch zip made by ``torch.jit.save`` (it has ``code/`` or ``constants.pkl``), not by ``torch.save``."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.count("/") >= 1 and n.split("/", 1)[1].startswith(("code/", "constants.pkl")) for n in names)


def read_torch_zip(path: str | Path, expected_sha256: str | None = None) -> tuple[dict[str, Tensor], bool]:
    """Tensors of a TorchScript / torch.save zip as ``{dotted attribute path: CPU tensor}``, plus whether it is
    TorchScript.

    ``constants.pkl`` tensors (graph constants, storages under ``constants/``) are returned as ``CONSTANTS.c<i>``.
    With ``expected_sha256`` the file hash is checked first.
    """
    path = str(path)
    if expected_sha256 is not None:
        verify_sha256(path, expected_sha256)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CmkitError(f"{path}: not a zip archive ({e}); expected a TorchScript decoder.pt") from None
    with archive:
        root = _root(archive, path)
        names = set(archive.namelist())
        is_script = f"{root}constants.pkl" in names or any(n.startswith(f"{root}code/") for n in names)
        out: dict[str, Tensor] = {}
        budget = [min(MAX_STORAGE_BYTES, MAX_EXPANSION * os.path.getsize(path))]
        try:
            obj = _RestrictedUnpickler(
                _read_pickle(archive, f"{root}data.pkl", path), archive, f"{root}data/", path, budget
            ).load()
            _collect(obj, "", out, set())
            if f"{root}constants.pkl" in names:
                consts = _RestrictedUnpickler(
                    _read_pickle(archive, f"{root}constants.pkl", path), archive, f"{root}constants/", path, budget
                ).load()
                for i, c in enumerate(consts if isinstance(consts, (list, tuple)) else ()):
                    if isinstance(c, Tensor):
                        out[f"CONSTANTS.c{i}"] = c
        except _ZIP_ERRORS as e:
            raise CmkitError(f"{path}: corrupt zip archive ({type(e).__name__}: {e})") from None
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
            raise CmkitError(f"{path}: unreadable pickle in the archive ({type(e).__name__}: {e})") from None
    return out, is_script


def _read_pickle(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
    """A pickle member of at most ``MAX_PICKLE_BYTES`` (declared size; zipfile stops reading there)."""
    size = archive.getinfo(name).file_size
    if size > MAX_PICKLE_BYTES:
        raise CmkitError(
            f"{path}: {name} declares {size} bytes, more than a module pickle needs "
            f"(at most {MAX_PICKLE_BYTES // 2**20} MiB); refusing a crafted archive"
        )
    return archive.read(name)
