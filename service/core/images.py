"""Image bytes -> the model's input tensor, following the model's own ``Preprocessing``.

Steps, in the metadata's order: convert to 1 or 3 channels (transparency over white; RGB or
BGR), resize to H x W with the model's filter (stretched, or the shorter side resized then
centre-cropped), multiply by ``scale`` ([0, 1] by default), invert if ``invert``, invert the
images whose border is the opposite of ``background``, ``(x - mean) / std``, then NCHW or NHWC.

The format is sniffed from the bytes (a client's filename or content type is not trusted),
the pixel count is checked from the header before any pixel is decoded, and the batch is
normalised in one vectorised numpy step: (N, C, H, W) (or (N, H, W, C)) float32.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.core.errors import (
    BadRequestError,
    PayloadTooLargeError,
    UnprocessableError,
    UnsupportedMediaTypeError,
)
from service.metadata import Preprocessing

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
_RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
}


def configure_pillow(max_image_pixels: int) -> None:
    """Align Pillow's decompression-bomb guard with our limit (it warns above the limit and
    raises above twice it; we refuse above the limit ourselves, before decoding)."""
    Image.MAX_IMAGE_PIXELS = max_image_pixels


def sniff_format(data: bytes) -> str | None:
    """The image format from the file's magic bytes, or None when it is none we read."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def decode_image(data: bytes, *, max_pixels: int, name: str = "image") -> Image.Image:
    """Decode one image (first frame of an animation), upright per its EXIF orientation.

    Raises 415 for bytes that are no supported image, 413 over ``max_pixels``, 400 for a
    truncated or corrupt file; ``name`` (e.g. the upload's filename) goes in the message.
    """
    return load_image(open_image(data, max_pixels=max_pixels, name=name), name=name)


def open_image(data: bytes, *, max_pixels: int, name: str = "image") -> Image.Image:
    """The image's header only, read without decoding a pixel: its format, size and mode,
    to decode later with ``load_image``. Raises as ``decode_image`` does."""
    if not data:
        raise BadRequestError(f"{name} is empty (0 bytes)", code="invalid_image")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMediaTypeError(
            f"{name} is not a supported image: its bytes start with {data[:8]!r}; "
            f"supported formats are {', '.join(SUPPORTED_FORMATS)}",
            code="unsupported_image_format",
        )
    with _pillow_errors(
        name, fmt, data, limit=min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    ):
        image = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = image.size
        if width * height > max_pixels:
            raise _too_many_pixels(name, fmt, width, height, max_pixels)
    return image


def load_image(image: Image.Image, *, name: str = "image") -> Image.Image:
    """Decode an image that ``open_image`` opened (its first frame), upright."""
    fmt = image.format or "image"
    with _pillow_errors(name, fmt, b"", limit=Image.MAX_IMAGE_PIXELS or 0):
        image.seek(0)  # first frame of a GIF or animated WebP
        image.load()
        if fmt == "JPEG":
            ImageOps.exif_transpose(image, in_place=True)
    return image


def decode_cost(image: Image.Image) -> int:
    """Bytes that decoding and converting ``image`` (opened, not decoded) may hold at once:
    its pixels times what each may take in ``load_image`` and ``_to_mode`` (the decoded
    pixels, plus the copies of a conversion; 16-bit and float images pass through float32)."""
    width, height = image.size
    per_pixel = 12 if image.mode in ("I", "F") or image.mode.startswith("I;16") else 10
    return width * height * per_pixel


@contextmanager
def _pillow_errors(name: str, fmt: str, data: bytes, limit: int) -> Iterator[None]:
    """Pillow's errors on a client's file ``data``, as our 413 (a decompression bomb over
    ``limit`` pixels) or 400."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between MAX_IMAGE_PIXELS and twice it: make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels(name, fmt, *_header_size(data, fmt), limit) from None
    except UnidentifiedImageError:
        raise BadRequestError(
            f"{name} is a truncated or corrupt {fmt} file: its header cannot be read",
            code="invalid_image",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadRequestError(
            f"{name} is a truncated or corrupt {fmt} file: {exc}", code="invalid_image"
        ) from None


def _too_many_pixels(
    name: str, fmt: str, width: int, height: int, max_pixels: int
) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"{name} is a {width}x{height} {fmt} ({width * height} pixels), over the limit of "
        f"{max_pixels} pixels (max_image_pixels)",
        code="image_too_large",
    )


def _header_size(data: bytes, fmt: str) -> tuple[int, int]:
    """Width and height from the header only, for the message of a decompression bomb."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                return Image.open(io.BytesIO(data), formats=[fmt]).size
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except Exception:  # noqa: BLE001 - only for a message
        return (0, 0)


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Grayscale (``L``) or ``RGB``; transparent pixels are composited over white. Each step
    makes one copy at most (``decode_cost`` counts on it)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        if image.mode != "RGBA":
            image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image)  # the alpha band as the mask
        image = background
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float grayscale: rescale to 8 bits instead of clipping.
        values = np.asarray(image, dtype=np.float32)
        top = np.float32(65535.0 if image.mode.startswith("I") and values.max() > 255 else 255.0)
        values *= np.float32(255.0) / top
        np.clip(values, 0, 255, out=values)
        image = Image.fromarray(values.astype(np.uint8), "L")
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def preprocess_images(images: Iterable[Image.Image], prep: Preprocessing) -> np.ndarray:
    """Convert, resize and normalise images per ``prep``: (N, C, H, W) or (N, H, W, C)
    float32. Each image is closed once resized, its pixels freed then: an iterator that
    decodes as it goes holds one decoded image at a time."""

    def resized(image: Image.Image) -> np.ndarray:
        try:
            return np.asarray(resize_image(_to_mode(image, prep.channels), prep))
        finally:
            image.close()

    pixels = np.stack([resized(im) for im in images])  # (N, H, W) or (N, H, W, 3), uint8
    # (N, 1, H, W) or (N, 3, H, W)
    pixels = pixels[:, None] if prep.channels == 1 else pixels.transpose(0, 3, 1, 2)
    if prep.channels == 3 and prep.channel_order == "BGR":
        pixels = pixels[:, ::-1]
    top = np.float32(255.0 * prep.scale)  # the scaled value of a white pixel
    x = pixels.astype(np.float32) * np.float32(prep.scale)  # [0, top]
    if prep.invert:
        x = top - x
    if prep.background is not None:
        x = _match_background(x, prep.background, top)
    mean = np.asarray(prep.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(prep.std, dtype=np.float32).reshape(1, -1, 1, 1)
    x = (x - mean) / std  # (N, C, H, W)
    if prep.layout == "NHWC":
        x = x.transpose(0, 2, 3, 1)  # (N, H, W, C)
    return np.ascontiguousarray(x, dtype=np.float32)


def resize_image(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize to ``prep.height`` x ``prep.width``: stretched, or (``shorter_side``) the
    shorter side to ``resize_size`` keeping the aspect ratio, then the centre crop, with
    torchvision's arithmetic (``Resize``: the longer side ``int(size * long / short)``;
    ``CenterCrop``: offsets ``int(round((side - crop) / 2))``)."""
    resample = _RESAMPLING[prep.resize]
    if prep.resize_mode == "stretch":
        return image.resize((prep.width, prep.height), resample)  # PIL takes (W, H)
    size = prep.resize_size or max(prep.height, prep.width)
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    image = image.resize((new_w, new_h), resample)
    left = int(round((new_w - prep.width) / 2.0))
    upper = int(round((new_h - prep.height) / 2.0))
    return image.crop((left, upper, left + prep.width, upper + prep.height))


def _match_background(x: np.ndarray, background: str, top: np.float32) -> np.ndarray:
    """Invert the images whose border is the opposite of the training images' background
    (a dark digit on white paper for a model trained on light ink on black), as training's
    ``image_background`` measured it: the mean of the border pixels in [0, 1] (x is in
    [0, ``top``])."""
    border = np.concatenate(
        [x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], axis=-1
    )  # (N, C, 2W + 2H)
    level = border.mean(axis=(1, 2)) / top  # (N,)
    flip = level > 0.5 if background == "dark" else level < 0.5
    return np.where(flip[:, None, None, None], top - x, x)


def default_preprocessing(
    model: str, input_shape: Sequence[object], *, allowed: bool = False
) -> Preprocessing:
    """Preprocessing for a model with neither our metadata nor a configuration.

    Unknown preprocessing is not guessed: 422 ``preprocessing_unknown``, saying how to describe
    it, unless ``allowed`` (the ``default_image_preprocessing`` setting) and the input is
    (N, C, H, W) with C in {1, 3} and fixed H and W: pixels are then stretched to H x W and
    scaled to [0, 1], nothing else (no mean/std are known). Any other input takes tensors
    only: 400 naming the model.
    """
    dims = list(input_shape)
    fixed = [d for d in dims[1:] if isinstance(d, int) and d > 0]
    image_shaped = len(dims) == 4 and len(fixed) == 3 and dims[1] in (1, 3)
    if not allowed:
        raise UnprocessableError(
            f"model {model!r} has no preprocessing: the service does not know how it expects "
            f"images (size, resize and crop, mean/std). Describe it in "
            f"models/{model}/config.json (docs/models.md), e.g. written by `python -m service "
            f"describe models/{model}/1/model.onnx --preset imagenet`; or send a tensor"
            + (
                "; or set RELU_SERVE_DEFAULT_IMAGE_PREPROCESSING=true to stretch images to "
                f"{fixed[1]}x{fixed[2]} and scale them to [0, 1]"
                if image_shaped
                else ""
            ),
            code="preprocessing_unknown",
        )
    if not image_shaped:
        raise BadRequestError(
            f"model {model!r} takes tensors only: it has no preprocessing metadata and its "
            f"input shape {dims} is not (N, 1 or 3, H, W); send a tensor instead, or "
            f"describe its preprocessing in models/{model}/config.json (docs/models.md)",
            code="tensor_input_only",
        )
    channels: Literal[1, 3] = 1 if fixed[0] == 1 else 3
    height, width = (int(d) for d in fixed[1:])
    return Preprocessing(
        height=height,
        width=width,
        channels=channels,
        mean=[0.0] * channels,
        std=[1.0] * channels,
    )
