"""Image decoding on the training device (`data.decode=gpu`): workers read, the device decodes.

Decoding a JPEG on one CPU core runs at 400-800 images/s, so a GPU step at 5,000+ samples/s would
need 8-15 cores per GPU for decoding alone. With `data.decode=gpu` a loader worker only parses each
JPEG's header (size, colour mode: no pixel is decoded) and draws the sample's crop from the sample's
own seed, exactly the draws the CPU path makes (`RandomResizedCrop.get_params` under the same seed), so
a resumed run crops every sample as an uninterrupted one does. The batch travels as one byte buffer
(`EncodedImages`: a few tensors, not one per image) and the training process decodes it with
`torchvision.io.decode_jpeg(list, device=...)` (nvJPEG's batched decoder on CUDA), then crops and
resizes each image on the device with the transform's interpolation (bicubic, antialiased, as PIL does
it for open_clip's transform).

What the device does not decode, the CPU does, and `decoded_on_cpu` counts it: in the worker, a PNG,
WebP or CMYK JPEG (through the CPU path's own transform); in the training process, a JPEG the device
decoder rejects (PIL, full size, the same crop). A JPEG that no decoder can read leaves its slot without
a real sample (`Batch.valid` False), counted as skipped_corrupt_media, like the CPU path.

Differences from the CPU path (tests/media/test_gpu_decode.py measures them): the decoders' IDCTs differ by
a level or two, and resizing on tensors rounds differently from PIL's; the CPU path may also decode a
large JPEG at reduced scale (`data.jpeg_draft`). Same crop, same size, close pixels.

This is our own code because no library does the split: torchvision decodes and resizes, but drawing
the crop in the worker from the header alone, under the loader's per-sample seed, is ours.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import NamedTuple

import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from pipeline.core.errors import ConfigError

log = logging.getLogger(__name__)

# modes nvJPEG decodes to RGB: colour and greyscale (CMYK / YCCK go to the CPU)
DEVICE_MODES = ("RGB", "L")


class EncodedJpeg(NamedTuple):
    """One sample's image as the worker hands it over: the file's bytes and its crop in the source."""

    data: bytes
    box: tuple[int, int, int, int]
    """top, left, height, width in the full-size image."""


class EncodedImages(NamedTuple):
    """A batch's images before decoding: JPEG bytes of most rows, decoded pixels of the rest."""

    data: torch.Tensor
    """uint8 [total bytes]: the JPEG files of the encoded rows, end to end."""
    offsets: torch.Tensor
    """int64 [B + 1]: row i's file is data[offsets[i]:offsets[i + 1]] (empty for a decoded row)."""
    boxes: torch.Tensor
    """int64 [B, 4]: top, left, height, width of each encoded row's crop (-1 for a decoded row)."""
    decoded: torch.Tensor
    """uint8 [n, 3, S, S]: the rows the worker decoded itself."""
    decoded_rows: torch.Tensor
    """int64 [n]: which rows `decoded` holds."""

    def __len__(self) -> int:  # rows, as a media tensor's len
        return len(self.boxes)


class DeviceCrop:
    """What the device applies after decoding: the crop draws and the output of a RandomResizedCrop.

    Built from the loader's image transform (models.image_pixel_transform): its steps must be one
    RandomResizedCrop and mode conversions to RGB; anything else (another augmentation) is refused,
    since the device would silently not apply it.
    """

    def __init__(self, transform):
        steps = list(getattr(transform, "steps", [transform]))
        crops = [step for step in steps if isinstance(step, RandomResizedCrop)]
        others = [step for step in steps if not isinstance(step, RandomResizedCrop)
                  and type(step).__name__ not in ("_ConvertMode", "MaybeConvertMode")]
        if len(crops) != 1 or others or getattr(transform, "mode", "RGB") != "RGB":
            raise ConfigError("data.decode=gpu applies open_clip's train transform (one RandomResizedCrop to RGB) on "
                              f"the device; this transform has other steps: {transform!r}. Use data.decode=cpu")
        crop = crops[0]
        if crop.interpolation not in (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR):
            raise ConfigError(f"data.decode=gpu resizes bicubic or bilinear, not {crop.interpolation.value}")
        self.crop = crop
        self.size = tuple(int(s) for s in crop.size)

    def box(self, image) -> tuple[int, int, int, int]:
        """The crop of a header-only PIL image, drawing from torch's RNG as RandomResizedCrop does."""
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        return int(top), int(left), int(height), int(width)

    def apply(self, image: torch.Tensor, box) -> torch.Tensor:
        """uint8 [3, h, w] (any device) -> uint8 [3, S, S]: crop, then resize antialiased as PIL does."""
        top, left, height, width = (int(v) for v in box)
        return TF.resized_crop(image, top, left, height, width, list(self.size),
                               interpolation=self.crop.interpolation, antialias=True)


def probe_jpeg(data: bytes):
    """A PIL image with only its header read, or None when the device cannot decode it (not a JPEG, or a
    colour mode nvJPEG does not turn into RGB). Raises like Image.open on bytes that are no image."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    if image.format != "JPEG" or image.mode not in DEVICE_MODES:
        return None
    return image


def collate(media: list, size: tuple[int, int]) -> EncodedImages | torch.Tensor:
    """Rows of EncodedJpeg or decoded uint8 [3, S, S] -> an EncodedImages (one byte buffer), or the
    stacked tensor when no row is encoded."""
    if not any(isinstance(row, EncodedJpeg) for row in media):
        return torch.stack(media)
    offsets, boxes, chunks, decoded, decoded_rows = [0], [], [], [], []
    for index, row in enumerate(media):
        if isinstance(row, EncodedJpeg):
            chunks.append(row.data)
            boxes.append(row.box)
        else:
            decoded.append(row)
            decoded_rows.append(index)
            boxes.append((-1, -1, -1, -1))
        offsets.append(offsets[-1] + (len(row.data) if isinstance(row, EncodedJpeg) else 0))
    data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    pixels = torch.stack(decoded) if decoded else torch.empty((0, 3, *size), dtype=torch.uint8)
    return EncodedImages(data, torch.tensor(offsets, dtype=torch.int64), torch.tensor(boxes, dtype=torch.int64),
                         pixels, torch.tensor(decoded_rows, dtype=torch.int64))


def concat(parts: list) -> EncodedImages:
    """Several workers' parts of one micro-batch (EncodedImages, or a stacked tensor where a part had no JPEG)
    joined into one EncodedImages, rows in part order."""
    datas, offsets, boxes, decoded, decoded_rows, rows, size = [], [torch.zeros(1, dtype=torch.int64)], [], [], [], 0, 0
    for part in parts:
        if not isinstance(part, EncodedImages):  # every row decoded by the worker
            part = EncodedImages(torch.zeros(0, dtype=torch.uint8), torch.zeros(len(part) + 1, dtype=torch.int64),
                                 torch.full((len(part), 4), -1, dtype=torch.int64), part,
                                 torch.arange(len(part), dtype=torch.int64))
        datas.append(part.data)
        offsets.append(part.offsets[1:] + size)
        size += len(part.data)
        boxes.append(part.boxes)
        decoded.append(part.decoded)
        decoded_rows.append(part.decoded_rows + rows)
        rows += len(part)
    return EncodedImages(torch.cat(datas), torch.cat(offsets), torch.cat(boxes), torch.cat(decoded),
                         torch.cat(decoded_rows))


def _decode_on_cpu(data: torch.Tensor) -> torch.Tensor:
    """PIL, full size, RGB -> uint8 [3, h, w]: for the JPEGs the device decoder rejects."""
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(data.numpy().tobytes()))
    image = image.convert("RGB") if image.mode != "RGB" else image
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def decode(batch: EncodedImages, crop: DeviceCrop, device: torch.device | str) -> tuple[torch.Tensor, list[int], int]:
    """-> (uint8 [B, 3, S, S] on `device`, rows no decoder could read, rows decoded on the CPU here).

    The encoded rows go to the device decoder as one batch; if it rejects the batch, each row is tried
    alone, and a row it still rejects is decoded by PIL on the CPU (then moved to the device). A failed
    row holds zeros: the caller marks it invalid and fills it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    rows = len(batch.boxes)
    out = torch.zeros((rows, 3, *crop.size), dtype=torch.uint8, device=device)
    if len(batch.decoded_rows):
        out[batch.decoded_rows.to(device)] = batch.decoded.to(device, non_blocking=True)
    offsets = batch.offsets.tolist()
    encoded = [i for i in range(rows) if offsets[i + 1] > offsets[i]]
    files = [batch.data[offsets[i]:offsets[i + 1]] for i in encoded]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec, whose JPEG decoding is not in the
        # pinned set yet; decode_jpeg is what the batched nvJPEG path is today
        warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities", category=DeprecationWarning)
        try:
            images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the batch: find it
            images = []
            for file in files:
                try:
                    images.append(decode_jpeg(file, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    images.append(None)
    failed, on_cpu = [], 0
    boxes = batch.boxes.tolist()
    for row, file, image in zip(encoded, files, images):
        if image is None:
            try:
                image = _decode_on_cpu(file).to(device)
                on_cpu += 1
            except Exception as error:  # noqa: BLE001 - any decoder error is a corrupt file here
                log.debug("row %d does not decode: %s", row, error)
                failed.append(row)
                continue
        out[row] = crop.apply(image, boxes[row])
    return out, failed, on_cpu
