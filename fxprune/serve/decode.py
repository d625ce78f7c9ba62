"""Request bodies to input batches for `fxprune serve`, within the budgets of
:mod:`fxprune.serve.limits`: JSON ``inputs``, base64 PNG/JPEG ``image`` (one or a
list) and raw ``.npy``. Every malformed body becomes a RequestError (a 4xx).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fxprune.errors import describe
from fxprune.serve.limits import (
    LIGHT_BODY_BYTES,
    MAX_REQUEST_PIXELS,
    DecodePools,
    Overloaded,
    npy_header,
)

if TYPE_CHECKING:
    from fxprune.serve.artifact import Artifact

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NPY_TYPES = ("application/octet-stream", "application/x-npy")


class RequestError(Exception):
    """A client mistake: becomes an HTTP ``status`` with ``message`` as the detail."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ImageList:
    """Base64 images of one request, decoded later in the heavy pool (`decode_images`)."""

    items: list[Any]


def decode_body(body: bytes, content_type: str, artifact: Artifact, max_samples: int = 64) -> Any:
    """The request's input batch as float32 (B, C, H, W) — or, for ``{"image": ...}``,
    an ImageList for `decode_images` — else RequestError."""
    kind = content_type.split(";")[0].strip().lower()
    if kind in NPY_TYPES:
        return check_input(_read_npy(body, artifact, max_samples), artifact, max_samples)
    if kind not in ("application/json", ""):
        raise RequestError(415, f"unsupported Content-Type {kind!r}: send application/json "
                                "or a .npy body as application/octet-stream")  # fmt: skip
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise RequestError(400, f"body is not valid JSON: {describe(err)}") from None
    if not isinstance(payload, dict) or len({"inputs", "image"} & payload.keys()) != 1:
        raise RequestError(422, 'JSON body must be an object with "inputs" or "image"')
    if "image" in payload:
        images = payload["image"] if isinstance(payload["image"], list) else [payload["image"]]
        if not images:
            raise RequestError(422, '"image" is an empty list: send at least one image')
        if len(images) > max_samples:
            raise RequestError(413, f"{len(images)} images in one request: at most "
                                    f"{max_samples} (--max-samples)")  # fmt: skip
        return ImageList(images)
    return check_input(_numeric(payload["inputs"]), artifact, max_samples)


def _numeric(value: Any) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError) as err:  # ragged nesting
        raise RequestError(422, f'"inputs" is not a rectangular array: {describe(err)}') from None
    if array.dtype.kind not in "iuf":
        raise RequestError(422, '"inputs" must be nested lists of numbers')
    return array


def _read_npy(body: bytes, artifact: Artifact, max_samples: int) -> np.ndarray:
    if not body.startswith(b"\x93NUMPY"):
        raise RequestError(400, "body is not a .npy file (numpy.save format)")
    try:  # the header is checked against the body before any data is read
        shape, dtype, _offset = npy_header(body)
    except TypeError:
        raise RequestError(422, ".npy holds Python objects: send a numeric array") from None
    except ValueError as err:
        raise RequestError(400, f"body is not a .npy array: {describe(err)}") from None
    if dtype.kind not in "iuf":
        raise RequestError(422, f".npy dtype {dtype} is not numeric (send float32)")
    _check_samples(shape, artifact, max_samples)
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise RequestError(400, f"body is not a .npy array: {describe(err)}") from None


def _check_samples(shape: tuple[int, ...], artifact: Artifact, max_samples: int) -> None:
    """413 for a batch larger than the per-request sample budget (checked on the shape)."""
    samples = shape[0] if len(shape) == len(artifact.sample_shape) + 1 else 1
    if samples > max_samples:
        raise RequestError(413, f"{samples} samples in one request: at most {max_samples} "
                                "(--max-samples)")  # fmt: skip


def check_input(array: np.ndarray, artifact: Artifact, max_samples: int = 64) -> np.ndarray:
    """Add the batch axis to one sample; refuse wrong shapes, too many samples and
    non-finite values."""
    sample = artifact.sample_shape
    _check_samples(array.shape, artifact, max_samples)
    if array.ndim == len(sample):
        array = array[None]
    if array.ndim != len(sample) + 1 or tuple(array.shape[1:]) != sample or not len(array):
        expected = ", ".join(map(str, sample))
        raise RequestError(
            422, f"input has shape {tuple(array.shape)}, expected ({expected}) or (B, {expected})"
        )
    fixed = artifact.fixed_batch
    if fixed and len(array) % fixed:
        raise RequestError(422, f"this artifact has a static batch of {fixed}: send a multiple")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise RequestError(422, "input contains NaN or infinity")
    return array


def decode_images(items: list[Any], artifact: Artifact) -> np.ndarray:
    """Base64 PNG/JPEG images as a preprocessed (B, C, H, W) float32 batch. Every header
    is read (and the request's pixel budget checked) before any image is decoded."""
    channels = (artifact.sample_shape + (0,))[0]
    if len(artifact.sample_shape) != 3 or channels not in (1, 3):
        raise RequestError(422, f"images need a (1|3, H, W) input, not {artifact.sample_shape}")
    images = [_open_image(item) for item in items]
    pixels = sum(image.width * image.height for image in images)
    if pixels > MAX_REQUEST_PIXELS:
        raise RequestError(413, f"the request's images hold {pixels:,} pixels: at most "
                                f"{MAX_REQUEST_PIXELS:,} per request")  # fmt: skip
    return np.stack([_preprocess(image, artifact) for image in images])


def decode_image(data: Any, artifact: Artifact) -> np.ndarray:
    """One base64 PNG/JPEG as a preprocessed (C, H, W) float32 sample."""
    return decode_images([data], artifact)[0]


def _open_image(data: Any) -> Any:
    """The image's header only (PIL opens lazily), with PIL's own bomb limit set first."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str):
        raise RequestError(422, '"image" must be a base64 string (or a list of them)')
    Image.MAX_IMAGE_PIXELS = MAX_REQUEST_PIXELS  # PIL refuses 2x this in open()
    try:
        raw = base64.b64decode(data.split(",")[-1], validate=True)  # allow a data: URL prefix
        image = Image.open(io.BytesIO(raw))
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f'"image" is not valid base64: {describe(err)}') from None
    except Image.DecompressionBombError as err:
        raise RequestError(413, f'"image" is too large: {describe(err)}') from None
    except (UnidentifiedImageError, OSError):
        raise RequestError(422, '"image" is not a PNG or JPEG image') from None
    if image.format not in ("PNG", "JPEG"):
        raise RequestError(422, f'"image" is {image.format}: send PNG or JPEG')
    return image


def _preprocess(image: Any, artifact: Artifact) -> np.ndarray:
    from PIL import Image

    channels, height, width = artifact.sample_shape
    try:
        image = image.convert("RGB" if channels == 3 else "L")
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt image data
        raise RequestError(422, f'"image" could not be decoded: {describe(err)}') from None
    pixels = np.asarray(image, dtype=np.float32).reshape(height, width, channels) / 255.0
    mean = np.asarray(artifact.mean, dtype=np.float32)[:channels]
    std = np.asarray(artifact.std, dtype=np.float32)[:channels]
    return ((pixels - mean) / std).transpose(2, 0, 1).copy()


async def decode_request(
    pools: DecodePools, body: bytes, content_type: str, artifact: Artifact, max_samples: int
) -> np.ndarray:
    """Decode in fxprune's own pools (a large body or any image in the heavy one). Every
    failure of a malformed body is a 4xx: anything unforeseen becomes a 400 naming it."""
    try:
        parsed = await pools.run(len(body) > LIGHT_BODY_BYTES, decode_body, body,
                                 content_type, artifact, max_samples)  # fmt: skip
        if isinstance(parsed, ImageList):
            parsed = await pools.run(True, decode_images, parsed.items, artifact)
        return parsed
    except RequestError:
        raise
    except Overloaded as err:
        raise RequestError(503, str(err)) from None
    except MemoryError:
        raise RequestError(413, "the request needs more memory than the server has") from None
    except Exception as err:  # a decoder failing in a way not foreseen above: still the body's
        raise RequestError(400, f"body could not be decoded: {describe(err)}") from None


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NPY_TYPES",
    "ImageList",
    "RequestError",
    "check_input",
    "decode_body",
    "decode_image",
    "decode_images",
    "decode_request",
]
