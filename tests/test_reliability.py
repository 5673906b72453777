"""Nothing lost: kill -9 and resume, crash safety, every bad image, corrupt caches, full disk."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from featurekit.cache import open_cache
from featurekit.errors import FeaturekitError
from featurekit import extract
from tests.conftest import TINY, invoke, make_image

ARGS = ["--model", "resnet18", "--weights", "none", "--image-size", "96", "--device", "cpu",
        "--batch-size", "8", "--workers", "0", "--no-progress", "--commit-seconds", "0",
        "--layers", "penultimate,layer2"]  # layer2 has many exact zeros: counts must resume too


def same_cache(a: Path, b: Path) -> None:
    """Every dataset bitwise equal, every attribute equal but the creation time."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        def walk(ga, gb, path):
            assert set(ga) == set(gb), path
            assert set(ga.attrs) == set(gb.attrs), path
            for k in ga.attrs:
                if k != "created":
                    assert np.array_equal(ga.attrs[k], gb.attrs[k]), (path, k)
            for k in ga:
                if isinstance(ga[k], h5py.Dataset):
                    assert ga[k].dtype == gb[k].dtype and np.array_equal(ga[k][()], gb[k][()]), path + k
                else:
                    walk(ga[k], gb[k], path + k + "/")

        walk(fa, fb, "/")


@pytest.fixture(scope="module")
def folder400(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("f400") / "imgs"
    for i in range(400):
        make_image(root / f"class{i % 4}" / f"{i:04d}.jpg", rng, size=(40, 36))
    for i in (37, 150, 333):  # a few broken files: skipped entries must resume exactly too
        (root / f"class{i % 4}" / f"{i:04d}.jpg").write_bytes(b"\xff\xd8\xff broken")
    return root


def as_terminal_job() -> None:
    """In the child, before featurekit starts: SIGINT's default action, as a terminal's
    foreground job has it. A job that a non-interactive shell starts in the background (a CI
    script's ``pytest &``) inherits SIGINT *ignored* (POSIX), and Python then never raises
    KeyboardInterrupt: that, not a phase of extract, is why this test once saw exit 0 on a
    loaded machine (issue 21)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(cmd, **kw):
    return subprocess.Popen([sys.executable, "-m", "featurekit", *map(str, cmd)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def test_ten_kill_resume_cycles_give_the_uninterrupted_cache(tmp_path, folder400):
    ref = tmp_path / "ref.h5"
    t0 = time.monotonic()
    assert run(["extract", folder400, "--out", ref, *ARGS]).wait(timeout=300) == 0
    full = time.monotonic() - t0
    with open_cache(ref) as c:
        assert sum(len(c.skipped(s)) for s in c.splits) == 3 and c.attrs["zero_fraction"]["layer2"] > 0.1
    out = tmp_path / "out.h5"
    rng = random.Random(0)
    kills = 0
    for cycle in range(10):
        before = out.stat().st_mtime_ns if out.exists() else None
        p = run(["extract", folder400, "--out", out, *ARGS, "--resume"])
        deadline = time.monotonic() + 4 * full + 60
        # wait until this run has committed something (start-up is most of a run), then kill
        # at a random moment of the pass
        while p.poll() is None and time.monotonic() < deadline:
            if out.exists() and out.stat().st_mtime_ns != before:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
        if out.exists():  # a killed file always opens, and its committed rows are there
            with h5py.File(out, "r") as f:
                for s in f:
                    rows = int(f[s].attrs["rows"])
                    assert f[s]["labels"].shape[0] >= rows and f[s]["paths"].shape[0] >= rows
                    assert all(p for p in f[s]["paths"][:rows])
    assert kills >= 8, kills  # (nearly) every cycle really was interrupted mid-pass
    p = run(["extract", folder400, "--out", out, *ARGS, "--resume"])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    same_cache(ref, out)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_ctrl_c_stops_cleanly_and_resumes(tmp_path, folder400, decode):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the prefetch
    thread, the writer thread and two DataLoader workers are busy: the process ends promptly
    with exit code 130 and one line, the file opens as incomplete, and --resume completes it to
    the uninterrupted cache."""
    # two workers; 'gpu' is the GPU path's code, run on the CPU
    args = [a if a != "0" or prev != "--workers" else "2" for prev, a in zip([None, *ARGS], ARGS)]
    args += ["--decode", decode]
    ref, out = tmp_path / "ref.h5", tmp_path / "out.h5"
    assert run(["extract", folder400, "--out", ref, *args]).wait(timeout=300) == 0
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as pytest run in the background:
    try:  # the child must still get the terminal's Ctrl-C
        p = run(["extract", folder400, "--out", out, *args], preexec_fn=as_terminal_job)
    finally:
        signal.signal(signal.SIGINT, ignored)
    deadline = time.monotonic() + 120
    first = None  # wait for a commit after the file's creation (HDF5 locks it for reading)
    while p.poll() is None and time.monotonic() < deadline:
        if out.exists():
            first = first or out.stat().st_mtime_ns
            if out.stat().st_mtime_ns != first:
                break
        time.sleep(0.01)
    time.sleep(0.3)
    assert p.poll() is None, "finished before it could be interrupted"
    t = time.monotonic()
    os.killpg(p.pid, signal.SIGINT)
    assert p.wait(timeout=30) == 130
    assert time.monotonic() - t < 20
    err = p.stderr.read()
    assert "interrupted" in err and "Traceback" not in err, err
    with h5py.File(out, "r") as f:
        assert not f.attrs.get("complete") and sum(int(f[s].attrs["rows"]) for s in f) > 0
    assert run(["extract", folder400, "--out", out, *args, "--resume"]).wait(timeout=300) == 0
    same_cache(ref, out)


def interrupt_after(batches: int, monkeypatch, source, out, **kw) -> None:
    """An extract interrupted (KeyboardInterrupt in the writer) after ``batches`` batches."""
    from featurekit.cache import CacheWriter

    real, calls = CacheWriter.advance, []

    def advance(self, *a, **k):
        calls.append(1)
        if len(calls) > batches:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(CacheWriter, "advance", advance)
    with pytest.raises(KeyboardInterrupt):
        extract(source, out, **kw)
    monkeypatch.setattr(CacheWriter, "advance", real)


def test_resumed_run_reports_its_own_images(tmp_path, image_folder, monkeypatch):
    """After --resume the summary counts the whole cache, but the rate (and `processed`) only
    the images this run read."""
    kw = dict(model="resnet18", weights="none", image_size=32, device="cpu", workers=0,
              batch_size=2, commit_seconds=0, progress=False)
    out = tmp_path / "c.h5"
    interrupt_after(3, monkeypatch, image_folder, out, **kw)
    s = extract(image_folder, out, resume=True, **kw)
    assert s.images == 18 and s.processed == 18 - 3 * 2  # three batches of two were committed
    assert s.images_per_second == pytest.approx(s.processed / s.seconds)


def test_resume_survives_stale_string_references(tmp_path, image_folder, monkeypatch):
    """A kill during a flush can leave, past the committed rows, string references to heap
    objects that never reached the disk, with the dataset's shape already cut (seen in the kill
    test). Overwriting such a slot made HDF5 free a missing object ("bad heap index"); resume
    must clear them and finish with the uninterrupted cache."""
    import struct

    kw = dict(model="resnet18", weights="none", image_size=32, device="cpu", workers=0,
              batch_size=2, commit_seconds=0, progress=False, val_fraction=0, test_fraction=0)
    ref, out = tmp_path / "ref.h5", tmp_path / "out.h5"
    extract(image_folder, ref, **kw)
    interrupt_after(2, monkeypatch, image_folder, out, **kw)
    with h5py.File(out, "r+") as f:
        g = f["train"]
        rows = int(g.attrs["rows"])
        assert rows == 4
        ds = g["paths"]
        ds.resize(rows, axis=0)  # the cut shape reached the disk...
        mask, raw = ds.id.read_direct_chunk((0,))
        size = len(raw) // ds.chunks[0]  # ...but not the cleared tail of its chunk
        bogus = struct.pack("<IQI", 15, 800, 90).ljust(size, b"\0")
        ds.id.write_direct_chunk((0,), raw[:rows * size] + bogus * (len(raw) // size - rows), mask)
    extract(image_folder, out, resume=True, **kw)
    same_cache(ref, out)


def test_resume_cases(tmp_path, image_folder, runner):
    out = tmp_path / "c.h5"
    # no output yet: --resume starts from scratch
    r = invoke(runner, "extract", image_folder, "--out", out, *TINY, "--resume")
    assert r.exit_code == 0, r.stderr
    # complete with the same options: says so, exit 0, file untouched
    before = out.read_bytes()
    r = invoke(runner, "extract", image_folder, "--out", out, *TINY, "--resume")
    assert r.exit_code == 0 and "already complete" in r.stderr and out.read_bytes() == before
    # other options, model or source: refused with one line, the file byte-identical (also an
    # interrupted one, whose uncommitted tail a reopen for writing would clear)
    with h5py.File(out, "a") as f:
        f.attrs["complete"] = False
    before = out.read_bytes()
    for extra, key in ((["--layers", "layer3"], "layers"), (["--seed", "3"], "seed"),
                       (["--batch-size", "7"], "batch_size")):
        r = invoke(runner, "extract", image_folder, "--out", out, *TINY, "--resume", *extra)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and key in r.stderr, r.stderr
        assert out.read_bytes() == before
    make_image(image_folder / "cat" / "new.jpg", np.random.default_rng(5))
    r = invoke(runner, "extract", image_folder, "--out", out, *TINY, "--resume")
    assert r.exit_code == 2 and "source_fingerprint" in r.stderr and out.read_bytes() == before
    # what is not a featurekit cache (a text file, another program's HDF5 file, a truncated
    # cache) is never replaced by --resume: one line, exit 2, byte-identical
    text = tmp_path / "draft.txt"
    text.write_text("my thesis, chapter 3\n")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w", libver="latest") as f:
        f["x"] = np.arange(5)
        f.attrs["owner"] = "another program"
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(before[:3000])
    for victim in (text, foreign, truncated):
        kept = victim.read_bytes()
        r = invoke(runner, "extract", image_folder, "--out", victim, *TINY, "--resume")
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "not a featurekit cache" in r.stderr and "--overwrite" in r.stderr, r.stderr
        assert victim.read_bytes() == kept
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # only --overwrite replaces it
    r = invoke(runner, "extract", image_folder, "--out", text, *TINY, "--overwrite")
    assert r.exit_code == 0, r.stderr
    with open_cache(text) as c:
        assert c.complete and sum(c.n_rows(s) for s in c.splits) == 19


def test_incomplete_cache_is_refused_or_marked(tmp_path, image_folder, runner):
    out = tmp_path / "c.h5"
    extract(image_folder, out, model="resnet18", weights="none", image_size=32, device="cpu",
            workers=0, progress=False)
    with h5py.File(out, "a") as f:
        f.attrs["complete"] = False
    for cmd in (["fit", out, "--head", "logistic", "--C", "1", "--out", tmp_path / "h.skops"],
                ["bench", out]):
        r = invoke(runner, *cmd)
        assert r.exit_code == 2 and "incomplete" in r.stderr and "--allow-incomplete" in r.stderr
    r = invoke(runner, "info", out)
    assert r.exit_code == 0 and "INCOMPLETE" in r.stdout
    r = invoke(runner, "fit", out, "--head", "logistic", "--C", "1", "--out", tmp_path / "h.skops",
               "--allow-incomplete")
    assert r.exit_code == 0, r.stderr


def _bad_corpus(root: Path) -> dict[str, str | None]:
    """Every awkward file kind; value: the expected outcome (None: decoded, else skipped)."""
    rng = np.random.default_rng(2)
    good = root / "a"
    make_image(good / "plain.jpg", rng)
    jpg = (good / "plain.jpg").read_bytes()
    (good / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (good / "zero.jpg").write_bytes(b"")
    (good / "text.png").write_text("not an image")
    Image.new("CMYK", (30, 20), (10, 200, 30, 0)).save(good / "cmyk.jpg")
    Image.fromarray((rng.random((20, 30)) * 65535).astype(np.uint16)).save(good / "deep16.png")
    Image.new("L", (25, 25), 128).save(good / "grey.png")
    pal = Image.new("P", (20, 20), 3)
    pal.info["transparency"] = 3
    pal.save(good / "palette.png", transparency=3)
    exif = Image.new("RGB", (40, 20), (255, 0, 0))
    ex = exif.getexif()
    ex[0x0112] = 6  # rotate 90° when shown
    exif.save(good / "rotated.jpg", exif=ex)
    Image.new("RGB", (20, 20), (0, 0, 255)).save(good / "photo.webp")
    Image.new("RGB", (20, 20), (0, 255, 0)).save(good / "UPPER.JPEG")
    Image.new("RGB", (21, 22)).save(good / "ünïcode name with spaces.png")
    (good / ".hidden.jpg").write_bytes(jpg)
    (good / "dup.jpg").write_bytes(jpg)
    os.symlink(good / "plain.jpg", good / "link.jpg")
    os.symlink(good / "missing.jpg", good / "dangling.jpg")
    (root / "empty_class").mkdir()
    # decompression-bomb sized: a PNG whose header claims more pixels than PIL allows
    bomb = Image.new("1", (1, 1))
    bomb.save(good / "bomb.png")
    data = bytearray((good / "bomb.png").read_bytes())
    import struct
    import zlib

    data[16:24] = struct.pack(">II", 20000, 20000)  # IHDR width/height: 400 Mpx
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    (good / "bomb.png").write_bytes(bytes(data))
    return {
        "a/plain.jpg": None, "a/truncated.jpg": "skip", "a/zero.jpg": "skip", "a/text.png": "skip",
        "a/cmyk.jpg": None, "a/deep16.png": None, "a/grey.png": None, "a/palette.png": None,
        "a/rotated.jpg": None, "a/photo.webp": None, "a/UPPER.JPEG": None,
        "a/ünïcode name with spaces.png": None, "a/dup.jpg": None, "a/link.jpg": None,
        "a/dangling.jpg": "skip", "a/bomb.png": "skip",
    }


def _half_refusing_hw(device):
    """A stand-in for nvImageCodec's JPEG engines on the CPU: decodes as torchvision does but
    refuses every other image (the fallbacks must take them)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas):
        out = []
        for k, d in enumerate(datas):
            try:
                out.append(None if k % 2 else decode_jpeg(d, mode=ImageReadMode.RGB))
            except RuntimeError:
                out.append(None)
        return out

    return decode


@pytest.mark.parametrize("decode", ["cpu", "gpu", "hw"])
def test_every_bad_image_kind(tmp_path, runner, decode, monkeypatch):
    """On every decode path ('gpu' is the GPU path's code, run here on the CPU; 'hw' the
    same with a stand-in for the JPEG engines that refuses half of the images)."""
    root = tmp_path / "bad"
    expected = _bad_corpus(root)
    out = tmp_path / "bad.h5"
    if decode != "cpu":
        from featurekit import _decode

        monkeypatch.setattr(_decode, "resolve", lambda *a: decode)
        monkeypatch.setattr(_decode.HwDecoder, "on", staticmethod(_half_refusing_hw))
    r = invoke(runner, "extract", root, "--out", out, *TINY, "--val-fraction", "0", "--test-fraction", "0")
    assert r.exit_code == 0, r.stderr
    assert "Traceback" not in r.stderr and "empty_class" in r.stderr  # warned, kept
    with open_cache(out) as c:
        assert c.attrs["decode"] == decode
    with open_cache(out) as c:
        assert c.classes == ["a", "empty_class"]
        rows, skipped = set(c.paths("train")), dict(c.skipped("train"))
    assert rows == {p for p, v in expected.items() if v is None}
    assert set(skipped) == {p for p, v in expected.items() if v == "skip"}
    assert all(reason for reason in skipped.values())
    assert "too large" in skipped["a/bomb.png"] and skipped["a/dangling.jpg"] == "file not found"
    from featurekit.data import load_image

    rotated = load_image(root / "a" / "rotated.jpg")
    assert rotated.size == (20, 40)  # EXIF orientation applied
    deep = np.asarray(load_image(root / "a" / "deep16.png"))
    assert deep.dtype == np.uint8 and deep.max() > 200  # 16-bit scaled, not clipped to white
    assert load_image(root / "a" / "cmyk.jpg").mode == "RGB"


def test_full_disk_leaves_no_complete_file(tmp_path, folder400):
    """A size-limited file (RLIMIT_FSIZE) stands in for a full disk: one line, exit 2."""
    out = tmp_path / "full.h5"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    r = subprocess.run([sys.executable, "-m", "featurekit", "extract", str(folder400), "--out",
                        str(out), *ARGS], capture_output=True, text=True, timeout=300,
                       preexec_fn=limit)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    if out.exists():  # whatever is left never passes for a complete cache
        from featurekit.errors import CacheError

        with pytest.raises(CacheError):
            open_cache(out)


def test_unwritable_output(tmp_path, image_folder, runner):
    if os.geteuid() == 0:
        ro = Path("/proc/featurekit.h5")  # not writable even by root
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        ro = tmp_path / "ro" / "x.h5"
    r = invoke(runner, "extract", image_folder, "--out", ro, *TINY)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1


# ---------------------------------------------------------------- corrupted caches (hypothesis)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("hc")
    rng = np.random.default_rng(3)
    for i in range(8):
        make_image(d / "imgs" / f"c{i % 2}" / f"{i}.png", rng)
    extract(d / "imgs", d / "c.h5", model="resnet18", weights="none", image_size=32,
            device="cpu", workers=0, progress=False, val_fraction=0, test_fraction=0.25)
    return (d / "c.h5").read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_corrupted_caches_raise_featurekit_errors(good_cache, tmp_path_factory, data):
    """Any truncation, byte damage or attribute tampering: a CacheError or a clean read."""
    blob = bytearray(good_cache)
    kind = data.draw(st.sampled_from(["truncate", "bytes", "attr", "delete"]))
    path = tmp_path_factory.mktemp("x") / "c.h5"
    if kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
        path.write_bytes(bytes(blob))
    elif kind == "bytes":
        for _ in range(data.draw(st.integers(1, 20))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        path.write_bytes(bytes(blob))
    else:
        path.write_bytes(bytes(blob))
        with h5py.File(path, "a") as f:
            if kind == "attr":
                key = data.draw(st.sampled_from(["format", "format_version", "classes", "layers",
                                                 "complete", "model"]))
                f.attrs[key] = data.draw(st.sampled_from([99, "x", "[", -1, "{}"]))
            else:
                target = data.draw(st.sampled_from(["train/labels", "train/paths", "test",
                                                    "train/features/penultimate", "train/skipped"]))
                del f[target]
    try:
        with open_cache(path) as c:
            for s in c.splits:
                c.labels(s), c.paths(s), c.skipped(s)
                for layer in c.layers:
                    c.features(s, layer)
            c.summary()
    except FeaturekitError:
        pass  # the one acceptable failure: a clean, one-line user error


def test_info_verify_reports_stale_sources(tmp_path, image_folder, runner, digits_cache):
    out = tmp_path / "v.h5"
    extract(image_folder, out, model="resnet18", weights="none", image_size=32, device="cpu",
            workers=0, progress=False)
    r = invoke(runner, "info", out, "--verify", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["verify"]["unchanged"] is True
    make_image(image_folder / "owl" / "added.jpg", np.random.default_rng(9))
    (image_folder / "dog" / "dog_1.jpg").unlink()
    changed = image_folder / "cat" / "cat_2.jpg"
    os.utime(changed, ns=(10**18, 10**18))
    r = invoke(runner, "info", out, "--verify", "--json")
    v = json.loads(r.stdout)["verify"]
    assert v["unchanged"] is False
    assert (v["added"], v["removed"], v["changed"]) == (["owl/added.jpg"], ["dog/dog_1.jpg"], ["cat/cat_2.jpg"])
    r = invoke(runner, "info", out, "--verify")
    assert "1 added, 1 removed, 1 changed" in r.stdout
    # digits: its data is fixed, so it verifies as unchanged
    assert json.loads(invoke(runner, "info", digits_cache, "--verify", "--json").stdout)["verify"]["unchanged"]
