"""service.core.images: format sniffing, decoding limits and errors, and preprocessing numerics."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.core.errors import (
    BadRequestError,
    PayloadTooLargeError,
    UnprocessableError,
    UnsupportedMediaTypeError,
)
from service.core.images import (
    configure_pillow,
    decode_image,
    default_preprocessing,
    preprocess_images,
    sniff_format,
)
from service.metadata import Preprocessing

MAX_PIXELS = 1_000_000


def encode(array: np.ndarray, fmt: str, mode: str | None = None, **save: object) -> bytes:
    """``array`` (H, W) or (H, W, C) uint8 written as ``fmt`` by Pillow."""
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def gradient(height: int, width: int, channels: int = 0) -> np.ndarray:
    """A deterministic uint8 test pattern, (H, W) or (H, W, C)."""
    y, x = np.mgrid[0:height, 0:width]
    base = ((x * 255) // max(width - 1, 1) + y * 7) % 256
    if not channels:
        return base.astype(np.uint8)
    return np.stack([(base + 40 * c) % 256 for c in range(channels)], axis=-1).astype(np.uint8)


@pytest.fixture(autouse=True)
def _pillow_limit() -> None:
    configure_pillow(MAX_PIXELS)


@pytest.mark.parametrize(
    ("fmt", "channels", "size"),
    [
        ("PNG", 0, (7, 13)),
        ("PNG", 3, (8, 8)),
        ("JPEG", 0, (31, 17)),
        ("JPEG", 3, (5, 9)),
        ("WEBP", 3, (33, 21)),
        ("BMP", 0, (11, 3)),
        ("BMP", 3, (6, 10)),
        ("GIF", 0, (20, 12)),
    ],
)
def test_decode_sniffs_format_and_keeps_size(fmt: str, channels: int, size: tuple) -> None:
    data = encode(gradient(*size, channels), fmt)
    assert sniff_format(data) == fmt
    image = decode_image(data, max_pixels=MAX_PIXELS)
    assert image.size == (size[1], size[0])  # PIL: (W, H)
    assert image.format == fmt


def test_gif_takes_the_first_frame() -> None:
    frames = [Image.fromarray(np.full((6, 6), v, np.uint8)) for v in (10, 200, 90)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    image = decode_image(buffer.getvalue(), max_pixels=MAX_PIXELS)
    x = preprocess_images([image], Preprocessing(height=6, width=6, channels=1, mean=[0], std=[1]))
    assert np.allclose(x, 10 / 255, atol=1 / 255)


def test_png_grayscale_numerics_match_numpy() -> None:
    pixels = gradient(8, 8)
    prep = Preprocessing(height=8, width=8, channels=1, mean=[0.5], std=[0.25], invert=True)
    x = preprocess_images([decode_image(encode(pixels, "PNG"), max_pixels=MAX_PIXELS)], prep)
    expected = ((1.0 - pixels / 255.0) - 0.5) / 0.25
    assert x.shape == (1, 1, 8, 8)
    assert x.dtype == np.float32
    assert np.allclose(x[0, 0], expected, atol=1e-5)


def test_colour_to_three_channels_is_nchw_with_per_channel_norm() -> None:
    pixels = gradient(4, 5, 3)
    prep = Preprocessing(height=4, width=5, channels=3, mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0])
    x = preprocess_images([decode_image(encode(pixels, "PNG"), max_pixels=MAX_PIXELS)], prep)
    expected = (pixels.transpose(2, 0, 1) / 255.0 - np.array([0.1, 0.2, 0.3])[:, None, None]) / (
        np.array([0.5, 0.25, 2.0])[:, None, None]
    )
    assert x.shape == (1, 3, 4, 5)
    assert np.allclose(x[0], expected, atol=1e-5)


def test_colour_to_grayscale_and_grayscale_to_colour() -> None:
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    gray_prep = Preprocessing(height=4, width=4, channels=1, mean=[0], std=[1])
    gray = preprocess_images([decode_image(encode(red, "PNG"), max_pixels=MAX_PIXELS)], gray_prep)
    assert np.allclose(gray, 76 / 255, atol=1 / 255)  # ITU-R 601-2 luma: 0.299 * 255 = 76
    colour_prep = Preprocessing(height=4, width=4, channels=3, mean=[0] * 3, std=[1] * 3)
    mid = np.full((4, 4), 128, np.uint8)
    colour = preprocess_images(
        [decode_image(encode(mid, "PNG"), max_pixels=MAX_PIXELS)], colour_prep
    )
    assert colour.shape == (1, 3, 4, 4)
    assert np.allclose(colour, 128 / 255)


def test_transparent_pixels_become_white() -> None:
    rgba = np.zeros((3, 3, 4), np.uint8)  # black, fully transparent
    prep = Preprocessing(height=3, width=3, channels=1, mean=[0], std=[1])
    x = preprocess_images([decode_image(encode(rgba, "PNG"), max_pixels=MAX_PIXELS)], prep)
    assert np.allclose(x, 1.0)


def test_resize_uses_the_models_filter_and_batches() -> None:
    big = gradient(40, 24)
    small = gradient(3, 3)
    prep = Preprocessing(height=8, width=8, channels=1, mean=[0], std=[1], resize="nearest")
    images = [decode_image(encode(a, "PNG"), max_pixels=MAX_PIXELS) for a in (big, small)]
    x = preprocess_images(images, prep)
    expected = np.asarray(Image.fromarray(big).resize((8, 8), Image.Resampling.NEAREST)) / 255
    assert x.shape == (2, 1, 8, 8)
    assert np.allclose(x[0, 0], expected, atol=1e-6)


def test_not_an_image_is_415_naming_the_formats() -> None:
    with pytest.raises(UnsupportedMediaTypeError, match="PNG, JPEG, WEBP, BMP, GIF") as info:
        decode_image(b"%PDF-1.7 not an image", max_pixels=MAX_PIXELS, name="doc.png")
    assert info.value.status_code == 415
    assert "doc.png" in info.value.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP"])
def test_truncated_file_is_400(fmt: str) -> None:
    data = encode(gradient(64, 64, 3), fmt)
    with pytest.raises(BadRequestError, match=f"truncated or corrupt {fmt}") as info:
        decode_image(data[: len(data) // 2], max_pixels=MAX_PIXELS)
    assert info.value.status_code == 400


def test_empty_bytes_is_400() -> None:
    with pytest.raises(BadRequestError, match="empty"):
        decode_image(b"", max_pixels=MAX_PIXELS)


def test_pixel_limit_is_413_naming_the_limit() -> None:
    data = encode(gradient(20, 30), "PNG")
    with pytest.raises(PayloadTooLargeError, match="30x20 PNG .*limit of 500 pixels"):
        decode_image(data, max_pixels=500)


def test_decompression_bomb_guard_is_413() -> None:
    """Pillow's own guard (MAX_IMAGE_PIXELS) fires at open; it is answered like our limit."""
    configure_pillow(100)
    data = encode(gradient(64, 64), "PNG")
    with pytest.raises(PayloadTooLargeError, match="64x64 PNG .*limit of 100 pixels"):
        decode_image(data, max_pixels=MAX_PIXELS)


def test_default_preprocessing_for_image_shaped_foreign_models_when_allowed() -> None:
    prep = default_preprocessing("foreign", ["N", 3, 16, 16], allowed=True)
    assert (prep.channels, prep.height, prep.width) == (3, 16, 16)
    assert prep.mean == [0.0] * 3
    assert prep.std == [1.0] * 3


def test_default_preprocessing_unknown_says_how_to_describe_the_model() -> None:
    with pytest.raises(UnprocessableError) as caught:
        default_preprocessing("foreign", ["N", 3, 16, 16])
    assert caught.value.code == "preprocessing_unknown"
    message = str(caught.value)
    assert "models/foreign/config.json" in message
    assert "python -m service describe" in message
    assert "RELU_SERVE_DEFAULT_IMAGE_PREPROCESSING=true" in message


@pytest.mark.parametrize("shape", [["N", 16], ["N", 2, 8, 8], ["N", 3, "H", "W"], [1, 3, 8]])
def test_default_preprocessing_refuses_non_images(shape: list) -> None:
    with pytest.raises(BadRequestError, match="model 'foreign' takes tensors only"):
        default_preprocessing("foreign", shape, allowed=True)


def test_images_against_the_training_background_are_inverted() -> None:
    """A dark digit on white paper, for a model trained on light ink on black: inverted, so
    both uploads give the same tensor."""
    ink = np.zeros((8, 8), np.uint8)
    ink[2:6, 3:5] = 255  # light stroke on black, like scikit-learn's digits
    prep = Preprocessing(height=8, width=8, channels=1, mean=[0.3], std=[0.4], background="dark")
    light_on_dark = preprocess_images(
        [decode_image(encode(ink, "PNG"), max_pixels=MAX_PIXELS)], prep
    )
    dark_on_light = preprocess_images(
        [decode_image(encode(255 - ink, "PNG"), max_pixels=MAX_PIXELS)], prep
    )
    assert np.allclose(light_on_dark, dark_on_light, atol=1e-6)
    assert np.allclose(light_on_dark[0, 0], (ink / 255.0 - 0.3) / 0.4, atol=1e-6)
    no_background = preprocess_images(
        [decode_image(encode(255 - ink, "PNG"), max_pixels=MAX_PIXELS)],
        prep.model_copy(update={"background": None}),
    )
    assert not np.allclose(no_background, light_on_dark)
