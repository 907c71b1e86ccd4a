"""Images in and out: images <-> tensors, reading image and .npz inputs, sample grids, PNG and .npz output.

:func:`read_image` and :func:`read_npz_images` are the one place user images are read (``cmkit edit`` inputs and
masks, ``cmkit eval`` samples, the ``folder`` and ``npz`` data sets): a bad file is one :class:`CmkitError` line
saying what was expected, never a traceback or a silently misread image.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import CmkitError

#: what an image input may be, for the messages
IMAGE_INPUT = "an 8-bit PNG or JPEG image"
NPZ_INPUT = "uint8 NHWC images (N, H, W, 1|3) under 'arr_0'"


def to_uint8(x: Tensor) -> np.ndarray:
    """Images in [-1, 1], (B, C, H, W) -> uint8 NHWC, quantised as in the reference code."""
    x = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def from_uint8(a: np.ndarray) -> Tensor:
    """uint8 NHWC (or NHW) -> float (B, C, H, W) in [-1, 1]."""
    if a.ndim == 3:
        a = a[..., None]
    return torch.from_numpy(np.array(a, copy=True)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _to_8bit(im, mode: str, p: Path, what: str):
    """A loaded PIL image as 8-bit ``mode`` ('L' or 'RGB'). 16-bit greys are scaled (v / 257, rounded), never
    clipped at 255 as Pillow's convert() does; 32-bit integer and float images are refused (no known range)."""
    from PIL import Image

    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):  # 16-bit PNG grey
        a = np.asarray(im).astype(np.float64)
        if a.min() < 0 or a.max() > 65535:
            raise CmkitError(f"{what} {p}: 16-bit values outside 0..65535; expected {IMAGE_INPUT}")
        im = Image.fromarray(np.round(a / 257).astype(np.uint8), "L")
    elif im.mode in ("I", "F") or im.mode.startswith(("I;", "F;")):
        kind = "floating-point" if im.mode.startswith("F") else "32-bit integer"
        raise CmkitError(f"{what} {p} is a {kind} ({im.mode}) image with no known range; expected {IMAGE_INPUT}")
    return im.convert(mode)


def read_image(path: str | Path, mode: str = "RGB", what: str = "image", size: int | None = None) -> np.ndarray:
    """One user image as uint8 (H, W) for ``mode='L'`` or (H, W, 3) for ``'RGB'``.

    ``size``: the image must be size×size (width and height, checked before decoding). Missing, empty, corrupt
    or truncated files, decompression bombs (Pillow's limit), and images without an 8-bit range (32-bit, float)
    are each one :class:`CmkitError` line; 16-bit greys are scaled to 8 bits."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise CmkitError(f"{what} not found: {p}" + (" (a directory)" if p.is_dir() else ""))
    if p.stat().st_size == 0:
        raise CmkitError(f"{what} {p} is empty (0 bytes); expected {IMAGE_INPUT}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's format notes would add lines to the one-line errors
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                if size is not None and im.size != (size, size):
                    raise CmkitError(f"{what} {p} is {im.width}×{im.height} but {size}×{size} images are expected here")
                im.load()
                im = ImageOps.exif_transpose(im)
                out = _to_8bit(im, mode, p, what)
    except CmkitError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CmkitError(
            f"{what} {p} is too large to decode safely (more than {Image.MAX_IMAGE_PIXELS:,} pixels: "
            "a possible decompression bomb)"
        ) from None
    except UnidentifiedImageError:
        raise CmkitError(
            f"{what} {p} cannot be read as an image (corrupt, truncated, or not a known format); expected {IMAGE_INPUT}"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise CmkitError(f"{what} {p} is corrupt or truncated ({detail}); expected {IMAGE_INPUT}") from None
    return np.asarray(out, np.uint8)


CROPS = ("adm", "center")


def crop_resize(im, size: int, how: str = "adm"):
    """A PIL image as a ``size``×``size`` square, as the papers prepared their data.

    ``adm``: ADM's ``center_crop_arr`` (Dhariwal & Nichol 2021, the ImageNet-64 and LSUN data of the CM paper):
    halve with a box filter while the short side is at least 2·size, resize bicubic so that the short side is
    ``size`` (rounding the long side), then take the centre window. ``center``: crop the centred square, then
    resize bicubic (the ``folder`` data set's behaviour)."""
    from PIL import Image

    if how not in CROPS:
        raise CmkitError(f"unknown crop {how!r}; expected one of {', '.join(CROPS)}")
    if how == "center":
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        return im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
    while min(im.size) >= 2 * size:
        im = im.resize((im.width // 2, im.height // 2), resample=Image.BOX)
    scale = size / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), resample=Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return im.crop((left, top, left + size, top + size))


def read_npz_images(
    path: str | Path, what: str = "images", *, square: bool = True, keys: tuple[str, ...] = ("arr_0",)
) -> np.ndarray:
    """uint8 NHWC images (N, H, W, C), C ∈ {1, 3}, from an ``.npz`` (NHW is read as one channel).

    The first of ``keys`` present holds them. Unreadable files, a missing key, other dtypes (floats are refused,
    not guessed at: [0, 1] or [0, 255]?), other shapes, no images, and non-square images when ``square`` are
    each one :class:`CmkitError` line."""
    import zipfile
    import zlib

    p = Path(path).expanduser()
    if not p.is_file():
        raise CmkitError(f"{what} not found: {p}" + (" (a directory)" if p.is_dir() else ""))
    check_npz_archive(p, what)
    try:
        with np.load(p, allow_pickle=False) as z:
            files = list(z.files)
            key = next((k for k in keys if k in files), None)
            if key is None:
                found = f"found keys {files}" if files else "it holds no arrays"
                raise CmkitError(f"{p}: expected uint8 NHWC images (N, H, W, 1|3) under {keys[0]!r}; {found}")
            a = z[key]
    except CmkitError:
        raise
    except (ValueError, OSError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, zlib.error) as e:
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise CmkitError(f"{p} is not a readable .npz archive ({detail}); expected {NPZ_INPUT}") from None
    return check_nhwc(a, f"{p}", square=square, key=key)


def check_npz_archive(path: str | Path, what: str = "file") -> None:
    """``path`` is an .npz (zip) archive: a .npy array, an image or anything else is one :class:`CmkitError` line."""
    import zipfile

    p = Path(path)
    if zipfile.is_zipfile(p):
        return
    with open(p, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise CmkitError(f"{what} {p} is a .npy array, not an .npz archive; save it with np.savez(path, arr_0=images)")
    raise CmkitError(f"{what} {p} is not an .npz archive (not a zip file); expected {NPZ_INPUT}")


def check_nhwc(a: np.ndarray, name: str, *, square: bool = True, key: str = "arr_0") -> np.ndarray:
    """Check (and return) an array of uint8 NHWC images; NHW gets a channel axis. One line per problem."""
    a = np.asarray(a)
    if a.dtype != np.uint8:
        hint = (
            " (floats are not rescaled: convert them with (x * 255).round().astype(np.uint8) from [0, 1])"
            if a.dtype.kind == "f"
            else ""
        )
        raise CmkitError(f"{name}: '{key}' holds {a.dtype} values; expected uint8 NHWC images{hint}")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        hint = "; that looks like NCHW, transpose it to NHWC" if a.ndim == 4 and a.shape[1] in (1, 3) else ""
        raise CmkitError(f"{name}: '{key}' has shape {a.shape}; expected uint8 NHWC images (N, H, W, 1|3){hint}")
    if a.shape[0] == 0 or a.shape[1] == 0 or a.shape[2] == 0:
        raise CmkitError(f"{name}: '{key}' holds no images (shape {a.shape})")
    if square and a.shape[1] != a.shape[2]:
        raise CmkitError(f"{name}: images are {a.shape[2]}×{a.shape[1]} (width×height); expected square images")
    return a


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile uint8 NHWC images into one uint8 HWC image (grey images become RGB)."""
    n, h, w, c = images.shape
    if c == 1:
        images = np.repeat(images, 3, axis=3)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid


def save_grid(x: Tensor | np.ndarray, path: str | Path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Save a batch (tensor in [-1, 1] or uint8 NHWC) as a PNG grid; small images are upscaled to be visible."""
    from PIL import Image

    images = to_uint8(x) if isinstance(x, Tensor) else x
    if scale is None:
        scale = max(1, 64 // images.shape[1])
    path = Path(path)
    grid = Image.fromarray(make_grid(images, nrow=nrow, scale=scale))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
    except ValueError as e:  # unknown file type
        raise CmkitError(f"cannot write {path}: {e}; use a .png file name") from None
    except OSError as e:
        raise CmkitError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def numbered_paths(out: str | Path, n: int) -> list[Path]:
    """The files of ``n`` images written to ``out``: ``out`` itself for one, ``out_0.png``, ``out_1.png``, …
    for several (``cmkit edit``, ``images`` and ``decode`` alike)."""
    out = Path(out).expanduser()
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def save_images(x: Tensor, out: str | Path) -> list[Path]:
    """Save images (B, C, H, W) in [-1, 1] as PNGs at their own size, to ``numbered_paths(out, B)``: 1 channel
    as greyscale, 3 as RGB (what ``read_image`` reads back exactly, so an output can be the next input)."""
    from PIL import Image

    paths = numbered_paths(out, len(x))
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for a, path in zip(to_uint8(x), paths):
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path)
    except ValueError as e:
        raise CmkitError(f"cannot write {out}: {e}; use a .png file name") from None
    except OSError as e:
        raise CmkitError(f"cannot write {out}: {e.strerror or e}") from None
    return paths


def save_npz(x: Tensor | np.ndarray, path: str | Path, labels: Tensor | None = None) -> Path:
    """Save samples as uint8 NHWC under ``arr_0`` (and labels under ``arr_1``), the reference format."""
    images = to_uint8(x) if isinstance(x, Tensor) else x
    path = Path(path)
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = labels.cpu().numpy()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a name without it
            np.savez(f, **arrays)
    except OSError as e:
        raise CmkitError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def write_npz_streamed(path: str | Path, parts: Sequence[Path]) -> tuple[int, bool]:
    """Concatenate ``.npz`` parts (uint8 NHWC under ``arr_0``, optional labels under ``arr_1``) into one ``.npz``
    at ``path``, holding one part in memory at a time: ``arr_0`` is streamed into the (uncompressed, zip64)
    archive, as ``np.savez`` would write it. Written beside ``path`` and renamed; returns (images, labelled)."""
    path = Path(path)
    heads = []
    for part in parts:
        with np.load(part, allow_pickle=False) as z:
            heads.append((z["arr_0"].shape, "arr_1" in z.files))
    if not heads or len({h[0][1:] for h in heads}) != 1 or len({h[1] for h in heads}) != 1:
        raise CmkitError(f"cannot merge {len(parts)} sample parts into {path}: none, or of different shapes")
    n, labelled = sum(h[0][0] for h in heads), heads[0][1]
    header = {"descr": "|u1", "fortran_order": False, "shape": (n, *heads[0][0][1:])}
    tmp, labels = path.with_name(path.name + ".cmkit-tmp"), []
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, header)
                for part in parts:
                    with np.load(part, allow_pickle=False) as z:
                        f.write(np.ascontiguousarray(z["arr_0"], np.uint8).tobytes())
                        if labelled:
                            labels.append(z["arr_1"])
            if labelled:
                buf = io.BytesIO()
                np.save(buf, np.concatenate(labels))
                zf.writestr("arr_1.npy", buf.getvalue())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CmkitError(f"cannot write {path}: {e.strerror or e}") from None
    return n, labelled
