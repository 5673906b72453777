"""The GPU decode path's pieces, run on the CPU: EXIF orientation, batched preprocessing, packed
worker batches, and the background threads of extract."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from featurekit import _decode, _pipeline
from featurekit.models import Preprocess


def _jpeg(w: int, h: int, seed: int = 0, orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    if orientation is None:
        img.save(buf, "JPEG", quality=92)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, "JPEG", quality=92, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_torchvision_and_pil(orientation):
    """nvJPEG ignores EXIF orientation; apply_orientation must turn the image exactly as
    torchvision's CPU decoder does (and as PIL's exif_transpose does)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = _jpeg(40, 24, seed=orientation, orientation=orientation)
    assert _decode._pixel_guard(data) == orientation
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    ours = _decode.apply_orientation(decode_jpeg(raw, mode=ImageReadMode.RGB), orientation)
    ref = decode_jpeg(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref)
    from featurekit.data import load_image

    pil = torch.from_numpy(np.array(load_image(io.BytesIO(data)))).permute(2, 0, 1)
    assert pil.shape == ours.shape
    assert (pil.int() - ours.int()).abs().float().mean() < 3  # two JPEG decoders, same pose


def test_pixel_guard_without_exif_and_for_bombs():
    assert _decode._pixel_guard(_jpeg(20, 20)) == 1
    data = bytearray(_jpeg(20, 20))
    # SOF0 height/width fields -> 60000 x 60000 pixels, far over PIL's limit
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2
    from featurekit.data import DecodeError

    with pytest.raises(DecodeError, match="too large"):
        _decode._pixel_guard(bytes(data))


PRE = [
    Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", True),
    Preprocess(64, 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic", True),
    Preprocess(48, 40, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "nearest", False),
    Preprocess(32, 40, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", True),  # pads
]


@pytest.mark.parametrize("pre", PRE, ids=lambda p: f"{p.interpolation}-{p.resize_size}-{p.crop_size}")
def test_batch_preprocess_matches_per_image_preprocess(pre):
    """The gpu path's batch-level preprocessing (two batched matrix products for every
    size at once) gives torchvision's numbers on images of every shape — up to a grey level
    where float rounding lands on the other side of .5, for a handful of pixels — and keeps
    ready rows as they are."""
    rng = np.random.default_rng(0)
    # some sizes repeat (resized together): in rows next to each other and apart
    shapes = [(375, 500), (500, 375), (pre.resize_size, pre.resize_size), (31, 200), (640, 300),
              (pre.resize_size, pre.resize_size + 7), (90, 60), (90, 60), (375, 500), (31, 200)]
    images = {2 * k: torch.from_numpy(rng.integers(0, 256, size=(3, h, w), dtype=np.uint8))
              for k, (h, w) in enumerate(shapes)}
    ready = {5: torch.randn(3, pre.crop_size, pre.crop_size)}
    batch = _decode.DecodedBatch(positions=list(range(2 * len(shapes))), images=images, ready=ready, failures=[])
    good, x = _decode.BatchPreprocess(pre, "cpu")(batch)
    assert good == sorted([*images, 5])
    assert x.shape == (len(good), 3, pre.crop_size, pre.crop_size)
    assert x.is_contiguous(memory_format=torch.channels_last)
    from torchvision.transforms.v2 import functional as F

    per_image = _decode.TensorPreprocess(pre)
    level = 1.0 / 255.0 / min(pre.std)  # one grey level, normalised
    for k, i in enumerate(good):
        if i in ready:
            assert torch.equal(x[k], ready[i])
            continue
        # what torchvision does with a uint8 image on a GPU: resize in float, clamp, round
        y = F.resize(images[i].float(), [pre.resize_size], interpolation=F.InterpolationMode(
            pre.interpolation), antialias=pre.antialias)
        y = F.center_crop(y.clamp(0, 255).round(), [pre.crop_size])
        ref = F.normalize(y / 255.0, list(pre.mean), list(pre.std))
        assert ref.shape == x[k].shape
        diff = (x[k] - ref).abs()
        assert diff.max() <= level + 1e-5
        assert (diff > 1e-4).float().mean() < 1e-3, (diff > 1e-4).float().mean()
        if pre.interpolation == "bilinear":
            # and the CPU path (torchvision's uint8 kernel): within one grey level of rounding
            assert (x[k] - per_image(images[i])).abs().max() <= level + 1e-5


def test_packed_batch_round_trip(tmp_path):
    """Workers pack a batch's JPEG bytes into one tensor; decoding them on the device ('gpu' path) gives
    the same pixels as decoding each file, PNGs arrive preprocessed, failures keep their reason,
    and a damaged JPEG is either decoded by the PIL fallback or skipped — never a crash."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from featurekit.data import open_source

    pre = Preprocess(40, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    jpegs = {f"j{k}.jpg": _jpeg(30 + 7 * k, 50 - 3 * k, seed=k, orientation=1 + k % 8) for k in range(5)}
    for name, data in jpegs.items():
        (folder / "a" / name).write_bytes(data)
    Image.new("RGB", (33, 44), (10, 200, 30)).save(folder / "a" / "p.png")
    (folder / "a" / "broken.jpg").write_bytes(jpegs["j0.jpg"][:40])  # header, no image data
    src = open_source(folder, val_fraction=0, test_fraction=0)
    items = src.splits["train"]
    ds = _decode.BytesDataset(src, items, pre)
    packed = _decode.collate_packed([ds[i] for i in range(len(items))])
    names = [it.path.split("/")[-1] for it in items]
    assert sorted(names[i] for i in packed.jpeg_positions) == sorted([*jpegs, "broken.jpg"])
    assert [names[i] for i in packed.ready_positions] == ["p.png"]
    assert packed.blob.numel() == packed.offsets[-1] == sum(map(len, jpegs.values())) + 40

    out = _decode.decode_on_device(packed, "cpu", ds.pil_transform)
    assert out.positions == list(range(len(items)))
    failed = {names[i]: reason for i, reason in out.failures}
    assert set(failed) <= {"broken.jpg"}
    assert set(out.images) | set(out.ready) | {i for i, _ in out.failures} == set(range(len(items)))
    for i in out.images:
        raw = torch.frombuffer(bytearray(jpegs[names[i]]), dtype=torch.uint8)
        ref = decode_jpeg(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        assert torch.equal(out.images[i], ref)
    png = names.index("p.png")
    assert out.ready[png].shape == (3, 32, 32)


def test_prefetcher_keeps_order_and_raises_in_the_consumer():
    with _pipeline.Prefetcher(iter(range(50)), lambda v: v * v) as it:
        assert list(it) == [v * v for v in range(50)]

    def boom(v):
        if v == 7:
            raise ValueError("bad item 7")
        return v

    seen = []
    with pytest.raises(ValueError, match="bad item 7"):
        with _pipeline.Prefetcher(iter(range(50)), boom) as it:
            for v in it:
                seen.append(v)
    assert seen == list(range(7))


def test_prefetcher_close_stops_a_producer_that_is_ahead():
    produced = []

    def slow(v):
        produced.append(v)
        return v

    p = _pipeline.Prefetcher(iter(range(10_000)), slow, depth=2)
    it = iter(p)
    assert next(it) == 0
    time.sleep(0.2)
    p.close()
    assert not p._thread.is_alive()
    assert len(produced) <= 5  # depth 2 ahead, not the whole input


def test_consumer_in_order_errors_and_close():
    got = []
    with _pipeline.Consumer(got.append, depth=2) as c:
        for v in range(100):
            c.put(v)
        c.join()
    assert got == list(range(100))

    def fail(v):
        if v == 3:
            raise OSError("disk full")
        got2.append(v)

    got2: list[int] = []
    c = _pipeline.Consumer(fail, depth=1)
    with pytest.raises(OSError, match="disk full"):
        for v in range(100):
            c.put(v)
        c.join()
    c.close()
    assert got2 == [0, 1, 2]

    # close(): the item in progress finishes, the rest are dropped, nothing runs afterwards
    started, release, done = threading.Event(), threading.Event(), []

    def slow(v):
        started.set()
        release.wait(5)
        done.append(v)

    c = _pipeline.Consumer(slow, depth=4)
    c.put(0)
    started.wait(5)
    for v in range(1, 4):
        c.put(v)
    threading.Timer(0.2, release.set).start()
    c.close()
    assert done == [0]


def test_nvjpeg_probe_explains_instead_of_raising():
    """extract probes nvJPEG once on CUDA (auto: falls back to the CPU path with a warning;
    --decode gpu: one-line error). The probe itself never raises."""
    problem = _decode.nvjpeg_problem("cpu")
    assert problem is not None and "on cpu" in problem  # decodes, but not onto a GPU
    if not torch.cuda.is_available():
        problem = _decode.nvjpeg_problem("cuda")
        assert isinstance(problem, str) and "\n" not in problem and len(problem) <= 200


class _FakeHw:
    """Stands in for nvImageCodec's hardware decoder on the CPU: decodes what torchvision
    decodes, but refuses (None) every image whose index is in ``refuse`` — as the JPEG engines
    refuse some progressive/CMYK files — or fails the whole call."""

    def __init__(self, refuse=(), fail=False):
        self.refuse, self.fail, self.calls = set(refuse), fail, 0

    def __call__(self, datas):
        from torchvision.io import ImageReadMode, decode_jpeg

        self.calls += 1
        if self.fail:
            raise RuntimeError("nvImageCodec: decoder error")
        out = []
        for k, d in enumerate(datas):
            try:
                out.append(None if k in self.refuse else decode_jpeg(d, mode=ImageReadMode.RGB))
            except RuntimeError:
                out.append(None)
        return out


@pytest.mark.parametrize("hw", [_FakeHw(), _FakeHw(refuse={0, 2, 3}), _FakeHw(fail=True)],
                         ids=["all", "some-refused", "call-fails"])
def test_hw_decode_falls_back_to_nvjpeg_then_pil(tmp_path, hw):
    """The hw path gives the nvJPEG path's images, orientation, ready rows and failures,
    whatever the engines refuse: refused images go to nvJPEG one by one, then PIL."""
    from featurekit.data import open_source

    pre = Preprocess(40, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    for k in range(5):
        (folder / f"j{k}.jpg").write_bytes(_jpeg(30 + 7 * k, 50 - 3 * k, seed=k, orientation=1 + k % 8))
    (folder / "broken.jpg").write_bytes(_jpeg(30, 30)[:40])
    Image.new("RGB", (33, 44), (10, 200, 30)).save(folder / "p.png")
    src = open_source(tmp_path / "imgs", val_fraction=0, test_fraction=0)
    ds = _decode.BytesDataset(src, src.splits["train"], pre)
    packed = _decode.collate_packed([ds[i] for i in range(len(ds))])
    ref = _decode.decode_on_device(packed, "cpu", ds.pil_transform)
    got = _decode.decode_on_device(packed, "cpu", ds.pil_transform, hw=hw)
    assert hw.calls == 1
    assert got.failures == ref.failures and [i for i, _ in got.failures]  # broken.jpg
    assert set(got.images) == set(ref.images) and set(got.ready) == set(ref.ready)
    for i in ref.images:
        assert torch.equal(got.images[i], ref.images[i])


def test_decode_choice_and_its_fallbacks(monkeypatch):
    """auto: hw, else nvJPEG (quietly: a GPU without JPEG engines is normal), else the CPU
    with a warning; --decode hw falls back the same way with one warning; gpu needs nvJPEG;
    hw without CUDA is refused; gpu with --device cpu is the batched path on the CPU; older
    caches' names for a path are today's."""
    from featurekit.errors import DeviceError, FeaturekitError

    def choose(decode, hw=None, nvjpeg=None, dev="cuda:0"):
        monkeypatch.setattr(_decode, "hw_problem", lambda d: hw)
        monkeypatch.setattr(_decode, "nvjpeg_problem", lambda d: nvjpeg)
        lines = []
        return _decode.resolve(decode, dev, lines.append), lines

    assert choose("auto") == ("hw", [])
    assert choose("auto", hw="not installed") == ("gpu", [])
    mode, lines = choose("auto", hw="not installed", nvjpeg="no nvJPEG")
    assert mode == "cpu" and len(lines) == 1 and "nvJPEG" in lines[0]
    assert choose("hw") == ("hw", [])
    mode, lines = choose("hw", hw="nvImageCodec is not installed")
    assert mode == "gpu" and len(lines) == 1 and "not installed" in lines[0] and "nvJPEG" in lines[0]
    mode, lines = choose("hw", hw="no engines", nvjpeg="no nvJPEG")
    assert mode == "cpu" and len(lines) == 1 and "no engines" in lines[0]
    assert choose("gpu", hw="no engines") == ("gpu", [])
    with pytest.raises(DeviceError, match="nvJPEG"):
        choose("gpu", nvjpeg="no nvJPEG")
    assert choose("cpu", hw="x", nvjpeg="y") == ("cpu", [])
    assert choose("auto", dev="cpu") == ("cpu", [])
    assert choose("gpu", dev="cpu") == ("gpu", [])
    with pytest.raises(FeaturekitError, match="needs a CUDA"):
        choose("hw", dev="cpu")
    assert choose("device", dev="cpu") == ("gpu", [])  # featurekit 0.1's name
    with pytest.raises(FeaturekitError, match="unknown --decode"):
        choose("nvJPEG", dev="cpu")


def test_hw_problem_names_the_extra_when_nvimagecodec_is_missing(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # import fails
    problem = _decode.hw_problem("cuda:0")
    assert "not installed" in problem and "featurekit[nvimgcodec]" in problem


def test_device_batches_on_the_hw_path(monkeypatch, tmp_path):
    """The whole hw pipeline (workers, prefetch thread, decode, batch preprocessing) on the
    CPU with the stand-in decoder: the same batches as the nvJPEG path."""
    from featurekit.data import open_source

    monkeypatch.setattr(_decode.HwDecoder, "on", staticmethod(lambda device: _FakeHw(refuse={1})))
    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    for k in range(7):
        (folder / f"j{k}.jpg").write_bytes(_jpeg(40 + 5 * k, 30 + 3 * k, seed=k))
    (folder / "junk.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 50)
    src = open_source(tmp_path / "imgs", val_fraction=0, test_fraction=0)
    items = src.splits["train"]
    pre = Preprocess(40, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    sampler = [[0, 1, 2, 3], [4, 5, 6, 7]]
    runs = {}
    for decode in ("gpu", "hw"):
        with _decode.device_batches(src, items, pre, decode, "cpu", sampler, 0) as ready:
            runs[decode] = list(ready)
    for (pa, ga, xa, fa), (pb, gb, xb, fb) in zip(runs["gpu"], runs["hw"]):
        assert pa == pb and ga == gb and fa == fb
        assert torch.equal(xa, xb)
    assert [reason for b in runs["hw"] for _, reason in b[3]]  # junk.jpg, with its reason


def test_out_of_memory_in_a_batch_decode_is_not_a_bad_file():
    """A decoder failing for lack of device memory must surface (extract turns it into one
    line and keeps the committed rows), not send every image to PIL."""
    def oom(datas):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    data = torch.frombuffer(bytearray(_jpeg(20, 20)), dtype=torch.uint8)
    with pytest.raises(torch.OutOfMemoryError):
        _decode._decode_batch([data], "cpu", oom)
    assert _decode._decode_batch([data], "cpu", lambda d: 1 / 0) == [None]  # any other failure


def test_a_decoder_answer_that_does_not_fit_falls_back():
    """A decoder returning fewer images than it was given, or an image that is not 3-channel
    CHW (a grey JPEG as HxWx1), never pairs pixels with the wrong file: those go to the
    fallbacks."""
    data = torch.frombuffer(bytearray(_jpeg(20, 20)), dtype=torch.uint8)
    grey = torch.zeros(1, 20, 20, dtype=torch.uint8)
    rgb = torch.zeros(3, 20, 20, dtype=torch.uint8)
    assert _decode._decode_batch([data, data], "cpu", lambda d: [rgb]) == [None, None]
    out = _decode._decode_batch([data, data], "cpu", lambda d: [grey, rgb])
    assert out[0] is None and out[1] is rgb


def test_resume_keeps_the_decode_path_and_ranks_agree(tmp_path, monkeypatch):
    """--resume with auto keeps the path the cache was started with (when the device has it);
    under torchrun every rank takes the most widely available of the ranks' paths."""
    from featurekit import _dist

    monkeypatch.setattr(_decode, "hw_problem", lambda d: None)  # JPEG engines "work"
    monkeypatch.setattr(_decode, "nvjpeg_problem", lambda d: None)
    one = _dist.Dist()
    lines = []
    assert _decode.choose("auto", "cuda:0", one, None, lines.append) == "hw"  # nothing recorded
    assert _decode.choose("auto", "cuda:0", one, "gpu", lines.append) == "gpu"  # started on nvJPEG
    assert _decode.choose("auto", "cuda:0", one, "nvjpeg", lines.append) == "gpu"  # 0.1's name
    assert _decode.choose("hw", "cuda:0", one, "gpu", lines.append) == "hw"  # asked for by name
    assert _decode.choose("auto", "cuda:0", one, "cpu", lines.append) == "cpu"
    assert _decode.choose("auto", "cpu", one, "gpu", lines.append) == "cpu"  # no GPU here now
    assert lines == []
    monkeypatch.setattr(_dist, "all_gather", lambda obj, d: ["hw", obj, "gpu"])
    rank0 = _dist.Dist(rank=0, world=3)
    assert _decode.choose("auto", "cuda:0", rank0, None, lines.append) == "gpu"
    assert len(lines) == 1 and "every rank uses gpu" in lines[0]


def test_recorded_decode_reads_the_cache_or_its_shard(tmp_path):
    import importlib

    from featurekit import _dist, shards
    from featurekit import extract

    ex = importlib.import_module("featurekit.extraction")
    root = tmp_path / "imgs" / "a"
    root.mkdir(parents=True)
    for k in range(4):
        (root / f"{k}.jpg").write_bytes(_jpeg(24, 24, seed=k))
    out = tmp_path / "c.h5"
    extract(tmp_path / "imgs", out, model="resnet18", weights="none", image_size=32, device="cpu",
            decode="gpu", workers=0, progress=False, val_fraction=0, test_fraction=0)
    assert ex._recorded_decode(out, _dist.Dist()) == "gpu"
    assert ex._recorded_decode(tmp_path / "none.h5", _dist.Dist()) is None
    (tmp_path / "junk.h5").write_bytes(b"junk")
    assert ex._recorded_decode(tmp_path / "junk.h5", _dist.Dist()) is None
    shard = shards.shard_path(out, 1, 2)
    shard.parent.mkdir()
    shard.write_bytes(out.read_bytes())
    assert ex._recorded_decode(out, _dist.Dist(rank=1, world=2)) == "gpu"
