"""Decode paths, the choice among them, and the pipeline that feeds ``extract`` and ``sparsity``.

One vocabulary everywhere (``--decode``, the cache's ``decode`` attribute, the code): ``cpu``,
``gpu``, ``hw``; ``auto`` resolves to one of them. Caches of older featurekit versions recorded
``nvjpeg``/``nvimgcodec-hw``/``device``: :func:`~featurekit.options.canonical_decode` reads them as ``gpu``/``hw``.

* ``cpu``: DataLoader workers decode and preprocess. JPEGs go through torchvision's libjpeg
  decoder and a uint8 tensor resize (about 2x faster than PIL on the benchmark's 500x375 JPEGs:
  1.2 vs 2.45 ms per image on one core); every other format goes through PIL
  (:func:`featurekit.data.load_image`), because torchvision's PNG decoder can crash the process
  on malformed files, returns uint16 for 16-bit PNGs and has no decompression-bomb guard.
* ``gpu``: workers only read file bytes; JPEGs are decoded in batches on the compute device
  (nvJPEG on CUDA, ``torchvision.io.decode_jpeg(..., device=...)``; torchvision's CPU decoder
  with ``--device cpu``, which is how the tests run this path) and resized, cropped and
  normalised there. Anything nvJPEG cannot decode falls back to the CPU path, or is skipped.
* ``hw``: as ``gpu``, the batch decoded by nvImageCodec on the GPU's hardware JPEG engines.

Before any torchvision decode, the pixel count from PIL's header (``Image.open`` without
loading) is checked against PIL's decompression-bomb limit.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any, NamedTuple

from featurekit.options import DECODE_PATHS as PATHS
from featurekit.options import DECODES
from featurekit.options import canonical_decode as canonical

JPEG_MAGIC = b"\xff\xd8\xff"


def check(decode: str) -> str:
    from featurekit.errors import FeaturekitError

    if canonical(decode) not in DECODES:
        raise FeaturekitError(f"unknown --decode {decode!r}; valid: {', '.join(DECODES)}")
    return canonical(decode)


def resolve(decode: str, dev: str, log) -> str:
    """``auto``/``hw``/``gpu``/``cpu`` -> the path this run takes on ``dev``. Each GPU decoder
    is probed once on CUDA. ``auto`` takes the first that works of hw, gpu (nvJPEG), cpu (the
    CPU with a warning); ``hw`` falls back the same way with one warning; ``gpu`` needs nvJPEG
    on CUDA (with ``--device cpu`` it is torchvision's batched decoder on the CPU)."""
    from featurekit.errors import DeviceError, FeaturekitError

    decode = check(decode)
    if not dev.startswith("cuda"):
        if decode == "hw":
            raise FeaturekitError("--decode hw needs a CUDA --device; use --decode cpu")
        return "cpu" if decode == "auto" else decode
    if decode == "cpu":
        return decode
    import torch

    index = torch.device(dev).index  # cuda:N: the probes' allocations on device N
    bound = index is not None and torch.cuda.is_available()
    with torch.cuda.device(index) if bound else contextlib.nullcontext():
        hw = hw_problem(dev) if decode in ("auto", "hw") else None
        if decode in ("auto", "hw") and hw is None:
            return "hw"
        nvjpeg = nvjpeg_problem(dev)
    if decode == "gpu" and nvjpeg:
        raise DeviceError(f"--decode gpu: nvJPEG does not work here ({nvjpeg}); use --decode cpu")
    if nvjpeg is None:
        if decode == "hw":
            log(f"warning: --decode hw: {hw}; decoding with nvJPEG on the GPU instead")
        return "gpu"
    why = f"{hw}; nvJPEG: {nvjpeg}" if decode == "hw" else f"nvJPEG does not work here ({nvjpeg})"
    log(f"warning: {why}; decoding on the CPU")
    return "cpu"


def choose(decode: str, dev: str, d, recorded: str | None, log) -> str:
    """The decode path of a run: ``decode`` resolved on this device, except that with ``auto``
    a ``recorded`` path (the one a resumed output was started with) is kept when this device
    has it (a resumed cache stays one run's), and that under torchrun every rank takes the
    same, the most widely available of the ranks' own (shards of one cache must agree)."""
    from featurekit import _dist

    recorded = canonical(recorded)
    if check(decode) == "auto" and (recorded == "cpu" or (recorded in PATHS and dev.startswith("cuda"))):
        decode = recorded
    mine = resolve(decode, dev, log)
    choices = _dist.all_gather(mine, d)
    chosen = min(choices, key=PATHS.index)
    if len(set(choices)) > 1 and d.main:
        log(f"note: the ranks' decoders differ ({', '.join(sorted(set(choices)))}); every rank "
            f"uses {chosen}")
    return chosen


def _pixel_guard(data: bytes) -> int:
    """Refuse an image over PIL's pixel limit, from its header alone; returns the EXIF
    orientation (1-8, 1 when absent or unreadable)."""
    from PIL import Image

    from featurekit.data import DecodeError, check_pixel_limit

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            size = im.size
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except Exception:
                orientation = 1
    except Image.DecompressionBombError as exc:  # over twice the limit: PIL refuses to open it
        raise DecodeError(f"image too large ({exc})") from None
    except Exception:
        return 1  # not PIL-readable: the decoder will say why
    check_pixel_limit(*size)
    return orientation if 1 <= orientation <= 8 else 1


def apply_orientation(x, orientation: int):
    """A CHW tensor turned upright by its EXIF orientation, as PIL's ``exif_transpose`` does
    (nvJPEG ignores the tag: torchvision applies it only when decoding on the CPU)."""
    import torch

    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-2, -1)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(x, -1, dims=(-2, -1))
    if orientation == 7:
        return x.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(x, 1, dims=(-2, -1))
    return x


class TensorPreprocess:
    """The :class:`~featurekit.models.Preprocess` steps on uint8 CHW tensors, on any device."""

    def __init__(self, preprocess) -> None:
        from torchvision.transforms import InterpolationMode

        self.p = preprocess
        self.interpolation = InterpolationMode(preprocess.interpolation)

    def __call__(self, x):
        import torch
        from torchvision.transforms.v2 import functional as F

        x = F.resize(x, [self.p.resize_size], interpolation=self.interpolation,
                     antialias=self.p.antialias)
        x = F.center_crop(x, [self.p.crop_size])
        x = F.to_dtype(x, torch.float32, scale=True)
        return F.normalize(x, list(self.p.mean), list(self.p.std))


def read_bytes(source, item) -> bytes:
    from featurekit.data import DecodeError

    try:
        with open(source.root / item.path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except OSError as exc:
        raise DecodeError(f"cannot read: {exc}") from None


def pil_from_bytes(data: bytes):
    from featurekit.data import load_image

    return load_image(io.BytesIO(data))


def decode_cpu(source, item, pil_transform, tensor_transform):
    """One image to a preprocessed float CHW tensor on the CPU (the ``cpu`` path)."""
    if source.kind == "digits":
        return pil_transform(source.load(item))
    data = read_bytes(source, item)
    if data[:3] == JPEG_MAGIC:
        _pixel_guard(data)
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            x = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                            mode=ImageReadMode.RGB, apply_exif_orientation=True)
            return tensor_transform(x)
        except RuntimeError:
            pass  # e.g. a truncated or exotic JPEG: PIL decides (and explains)
    return pil_transform(pil_from_bytes(data))


class CpuDataset:
    """position -> (position, float tensor or None, reason); decoding in the worker."""

    def __init__(self, source, items, preprocess) -> None:
        self.source, self.items = source, items
        self.pil_transform = preprocess.transform()
        self.tensor_transform = TensorPreprocess(preprocess)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return i, decode_cpu(self.source, self.items[i], self.pil_transform,
                                 self.tensor_transform), ""
        except Exception as exc:  # one bad file must never stop the run; record why
            return i, None, _reason(exc)


def nvjpeg_problem(device: str) -> str | None:
    """None when torchvision can decode a JPEG on ``device`` (a CUDA device), else why not
    (e.g. a torchvision built without nvJPEG): checked once, before a run relies on it."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    try:
        data = encode_jpeg(torch.full((3, 16, 16), 128, dtype=torch.uint8))
        img = decode_jpeg([data], mode=ImageReadMode.RGB, device=device)[0]
        if tuple(img.shape) != (3, 16, 16) or img.device.type != "cuda":
            return f"decoded to {tuple(img.shape)} on {img.device}"
        return None
    except Exception as exc:
        return _why(exc)


def _why(exc: Exception) -> str:
    """A probe's failure in one short line."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:200]


class BytesDataset:
    """position -> (position, kind, payload, reason) for the ``gpu``/``hw`` paths, packed per batch
    by :func:`collate_packed`: ``("jpeg", (bytes, EXIF orientation))`` for JPEGs, ``("ready",
    float tensor)`` for other formats (decoded by PIL in the worker), ``(None, None, reason)``
    for failures."""

    def __init__(self, source, items, preprocess) -> None:
        self.source, self.items = source, items
        self.pil_transform = preprocess.transform()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            item = self.items[i]
            if self.source.kind == "digits":
                return i, "ready", self.pil_transform(self.source.load(item)), ""
            data = read_bytes(self.source, item)
            if data[:3] == JPEG_MAGIC:
                return i, "jpeg", (data, _pixel_guard(data)), ""
            return i, "ready", self.pil_transform(pil_from_bytes(data)), ""
        except Exception as exc:  # one bad file must never stop the run; record why
            return i, None, None, _reason(exc)


class PackedBatch(NamedTuple):
    """One batch of the ``gpu``/``hw`` paths as the workers hand it over: every JPEG's bytes in one
    tensor (one shared-memory transfer per batch instead of one per image)."""

    positions: list[int]
    jpeg_positions: list[int]
    blob: Any  # uint8 tensor: the JPEGs one after another
    offsets: list[int]  # len(jpeg_positions) + 1 boundaries into blob
    orientations: list[int]
    ready_positions: list[int]
    ready: Any  # float tensor (n_ready, 3, crop, crop), or None
    failures: list[tuple[int, str]]


def collate_packed(batch) -> PackedBatch:
    import torch

    jpegs = [(i, payload) for i, kind, payload, _ in batch if kind == "jpeg"]
    ready = [(i, payload) for i, kind, payload, _ in batch if kind == "ready"]
    offsets = [0]
    for _, (data, _) in jpegs:
        offsets.append(offsets[-1] + len(data))
    blob = torch.frombuffer(bytearray(b"".join(d for _, (d, _) in jpegs)) or bytearray(1),
                            dtype=torch.uint8)
    return PackedBatch(
        positions=[e[0] for e in batch],
        jpeg_positions=[i for i, _ in jpegs], blob=blob, offsets=offsets,
        orientations=[o for _, (_, o) in jpegs],
        ready_positions=[i for i, _ in ready],
        ready=torch.stack([t for _, t in ready]) if ready else None,
        failures=[(i, reason) for i, kind, _, reason in batch if kind is None],
    )


class DecodedBatch(NamedTuple):
    """A batch after decoding on the device: ``images`` are upright uint8 CHW tensors of any
    size; ``ready`` are preprocessed float tensors (PIL's decodes, nvJPEG's fallbacks)."""

    positions: list[int]
    images: dict[int, Any]
    ready: dict[int, Any]
    failures: list[tuple[int, str]]


def decode_on_device(b: PackedBatch, device: str, pil_transform, hw=None) -> DecodedBatch:
    """The batch's JPEGs decoded together on the device: by ``hw`` (a :class:`HwDecoder`,
    the GPU's hardware JPEG engines) when given, else by nvJPEG (``decode_jpeg`` on the CPU
    elsewhere, so the same code runs in tests). What the first decoder refuses goes to nvJPEG
    one image at a time, then to PIL on the CPU (CMYK, exotic or damaged JPEGs), or is
    recorded as a failure with its reason."""
    images: dict[int, Any] = {}
    ready: dict[int, Any] = {}
    failures = list(b.failures)
    if b.ready is not None:
        for i, t in zip(b.ready_positions, b.ready.to(device, non_blocking=True)):
            ready[i] = t
    datas = [b.blob[s:e] for s, e in zip(b.offsets, b.offsets[1:])]
    decoded = _decode_batch(datas, device, hw) if datas else []
    for i, data, img, orientation in zip(b.jpeg_positions, datas, decoded, b.orientations):
        if img is None:
            img = _nvjpeg_one(data, device)
        if img is not None:
            images[i] = apply_orientation(img, orientation)
            continue
        try:  # what neither GPU decoder reads: PIL on the CPU
            ready[i] = pil_transform(pil_from_bytes(data.numpy().tobytes())).to(device)
        except Exception as exc:
            failures.append((i, _reason(exc)))
    failures.sort()
    return DecodedBatch(b.positions, images, ready, failures)


def _decode_batch(datas: list[Any], device: str, hw) -> list[Any]:
    """One batched call; a None for each image it did not decode as 3-channel CHW (all, if the
    call failed: one bad file fails nvJPEG's whole batch). Running out of device memory is not
    a bad file: it is raised."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        with stream_safe(device):
            out = hw(datas) if hw is not None else decode_jpeg(datas, mode=ImageReadMode.RGB,
                                                                device=device)
    except torch.OutOfMemoryError:
        raise
    except Exception:
        return [None] * len(datas)
    if len(out) != len(datas):  # never pair images with the wrong files
        return [None] * len(datas)
    return [img if img is not None and img.ndim == 3 and img.shape[0] == 3 else None for img in out]


def _nvjpeg_one(data, device: str):
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        with stream_safe(device):
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except torch.OutOfMemoryError:
        raise
    except Exception:
        return None


@contextlib.contextmanager
def stream_safe(device: str):
    """Around a decoder that writes on a CUDA stream of its own (nvJPEG in torchvision, the
    hardware engines of nvImageCodec, which ignore the stream they are given), while its
    outputs come from torch's caching allocator on the current stream: first, every kernel
    queued on the current stream finishes (memory freed by the previous batch may be handed
    to the decoder while such a kernel still reads it: silently wrong pixels); after, the
    current stream waits for the decoder (torchvision's nvJPEG orders its outputs on the
    current stream itself; the engines may not). Host-side waits on this (prefetch) stream
    only: the model's stream runs on. Nothing to do on the CPU."""
    import torch

    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.current_stream(torch.device(device)).synchronize()
    try:
        yield
    except BaseException:  # a refused batch: its outputs' memory goes back to the allocator,
        if cuda:  # so the decoder's own stream must be done with it (rare: the whole device)
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(torch.device(device))
        raise
    if cuda:
        torch.cuda.current_stream(torch.device(device)).synchronize()


def _reason(exc: Exception) -> str:
    from featurekit.data import DecodeError

    return str(exc) if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {exc}"


HW_HINT = "pip install \"featurekit[nvimgcodec]\""


class HwDecoder:
    """nvImageCodec's decoder on the GPU's hardware JPEG engines (A100, H100, H200 and
    others have them): the engines decode while the SMs run the model. Called with a batch of
    JPEG byte tensors, it returns a uint8 CHW tensor on the device per image, as stored
    (EXIF orientation is applied by the caller, as for nvJPEG), or None for an image the
    engines refuse (e.g. some progressive or CMYK files)."""

    _made: dict[str, HwDecoder] = {}

    @classmethod
    def on(cls, device: str) -> HwDecoder:
        """One decoder per device and process: the probe's is the one the run uses (making
        one costs a noticeable part of a second)."""
        if device not in cls._made:
            if not cls._made:  # decoders go before the CUDA context does at exit
                import atexit

                atexit.register(cls.release)
            cls._made[device] = cls(device)
        return cls._made[device]

    @classmethod
    def release(cls, device: str | None = None) -> None:
        """Drop the decoder of ``device`` (all: None) while the CUDA context is alive: at the
        end of a run, and at exit before the interpreter's teardown, whose order would not
        guarantee it."""
        for key in [device] if device is not None else list(cls._made):
            cls._made.pop(key, None)

    def __init__(self, device: str) -> None:
        import torch

        _quiet_nvimgcodec()
        from nvidia import nvimgcodec

        index = torch.device(device).index
        self.device = device
        self._decoder = nvimgcodec.Decoder(
            device_id=torch.cuda.current_device() if index is None else index,
            backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)])
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False,
                                               color_spec=nvimgcodec.ColorSpec.RGB)

    def __call__(self, datas: list[Any]) -> list[Any]:
        import torch

        stream = torch.cuda.current_stream(self.device).cuda_stream
        out = self._decoder.decode([d.numpy().tobytes() for d in datas], params=self._params,
                                   cuda_stream=stream)
        # DLPack hands the device buffers over without a copy, ordered on this stream
        return [None if im is None else torch.from_dlpack(im).permute(2, 0, 1) for im in out]


def _quiet_nvimgcodec() -> None:
    """nvImageCodec's Python API prints a WARNING line per image its engines refuse; featurekit
    retries such images with nvJPEG or PIL and records what fails, so only its errors are
    shown (PYNVIMGCODEC_VERBOSITY=1, read at import; a value the user set is kept)."""
    import os

    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "1")


def hw_problem(device: str) -> str | None:
    """None when nvImageCodec's hardware JPEG decoder works on ``device``, else why not (not
    installed, no JPEG engines on this GPU, a decoder that cannot be created), checked once
    on a small JPEG before a run relies on it."""
    import torch
    from torchvision.io import encode_jpeg

    try:
        _quiet_nvimgcodec()
        import nvidia.nvimgcodec as _probe  # noqa: F401

        del _probe
    except ImportError:
        return f"nvImageCodec is not installed ({HW_HINT})"
    try:
        g = torch.Generator().manual_seed(0)  # a photo-sized baseline JPEG, 4:2:0 like most
        data = encode_jpeg(torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8, generator=g))
        img = HwDecoder.on(device)([data])[0]
        if img is None:
            return "this GPU's hardware JPEG decoder refused a plain JPEG (no JPEG engines?)"
        if tuple(img.shape) != (3, 256, 320):
            return f"decoded to {tuple(img.shape)}"
        return None
    except Exception as exc:
        return _why(exc)


class BatchPreprocess:
    """The :class:`~featurekit.models.Preprocess` steps for a decoded batch on the device, as
    a few batch-level kernels whatever the mix of image sizes: resize and centre-crop of every
    image at once as two batched matrix products (:mod:`featurekit._resize`), then rounding,
    scaling and normalisation of the whole batch, written channels_last for the forward pass.

    Same numbers as :class:`TensorPreprocess` on uint8 images up to float rounding: resized
    values are rounded and clamped to 0..255, as torchvision's uint8 resize does on the GPU.
    """

    def __init__(self, preprocess, device: str, precision: str = "fp32") -> None:
        import torch

        self.p = preprocess
        self.device = device
        # the resize's matrix products in float16 on a GPU when the pass itself is bf16/fp16
        half = precision != "fp32" and device.startswith("cuda")
        self.dtype = torch.float16 if half else torch.float32
        self.mode = preprocess.interpolation
        self.antialias = bool(preprocess.antialias)
        std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), mean / std  # (x/255 - mean)/std
        self.round = self.mode not in ("nearest", "nearest-exact")

    def __call__(self, batch: DecodedBatch):
        """-> (good positions, float tensor (n, 3, crop, crop) channels_last, or None)."""
        import torch

        from featurekit._resize import resize_crop

        good = sorted(set(batch.images) | set(batch.ready))
        if not good:
            return good, None
        x = None
        if batch.images:
            x = resize_crop([batch.images[i] for i in good if i in batch.images],
                            self.p.resize_size, self.p.crop_size, self.mode, self.antialias,
                            dtype=self.dtype)
            if self.round:
                x.round_().clamp_(0, 255)
            x = x.mul_(self.scale).sub_(self.shift).contiguous(memory_format=torch.channels_last)
        if batch.ready:  # PIL's decodes (other formats, nvJPEG's refusals), rarer
            c = self.p.crop_size
            out = torch.empty((len(good), 3, c, c), dtype=torch.float32, device=self.device,
                              memory_format=torch.channels_last)
            rows = {i: k for k, i in enumerate(good)}
            if x is not None:
                out[_rows(rows, batch.images, self.device)] = x
            out[_rows(rows, batch.ready, self.device)] = torch.stack(
                [batch.ready[i] for i in sorted(batch.ready)])
            x = out
        return good, x


def _rows(rows: dict[int, int], chosen: dict[int, Any], device: str):
    import torch

    return torch.tensor([rows[i] for i in sorted(chosen)], device=device)


@contextlib.contextmanager
def device_batches(source, items, preprocess, decode: str, device: str, batch_sampler,
                   workers: int, precision: str = "fp32"
                   ) -> Iterator[Iterator[tuple[list[int], list[int], Any, list]]]:
    """Batches of ``items`` ready for the forward pass: (positions, good positions, float
    tensor on ``device`` in channels_last or None, [(position, reason)]).

    DataLoader workers decode (``cpu``) or read bytes (``gpu``, ``hw``); a prefetch thread readies
    each batch for the device on its own CUDA stream (nvJPEG's blocking batch decode and the
    batch-level resize and normalisation, or the pinned host-to-device copy), so the consuming
    thread only runs the model, and each batch reaches it as one tensor. Used by ``extract``
    and by the benchmark's decode ceilings.
    """
    import torch

    from featurekit import _pipeline
    from featurekit.data import collate

    on_cuda = device.startswith("cuda")
    if decode in ("gpu", "hw"):
        dataset = BytesDataset(source, items, preprocess)
        collate_fn = collate_packed
        prepare = BatchPreprocess(preprocess, device, precision)
        hw = HwDecoder.on(device) if decode == "hw" else None

        def fetch(b):  # prefetch thread: the batch's decode and preprocessing, on its stream
            decoded = decode_on_device(b, device, dataset.pil_transform, hw)
            good, x = prepare(decoded)
            return b.positions, good, x, decoded.failures
    else:
        dataset, collate_fn = CpuDataset(source, items, preprocess), collate

        def fetch(b):  # prefetch thread: the host-to-device copy on its own stream
            positions, good, x, failures = b
            if x is not None:
                x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            return positions, good, x, failures

    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_fn,
        pin_memory=on_cuda and decode == "cpu", prefetch_factor=4 if workers else None,
    )

    workers_iter = iter(loader)  # workers start before any thread does
    try:
        with _pipeline.Prefetcher(workers_iter, fetch, device) as fetched:
            yield iter(fetched)
    finally:
        del workers_iter  # the workers stop now, not when the caller returns
        if decode == "hw":
            hw = None
            HwDecoder.release(device)
