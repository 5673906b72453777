"""Resize-then-centre-crop of a whole batch of images of different sizes in a few kernels.

torchvision's ``resize(size=[s])`` followed by ``center_crop(c)`` is separable: along each
axis, every output pixel is a weighted sum of input pixels. For image ``k`` that is a matrix
``A_k`` (crop rows x input height) and ``B_k`` (crop columns x input width), and the result is
``A_k @ X_k @ B_k.T`` per channel. With the images zero-padded to the batch's largest height
and width and the matrices zero-padded alike, the whole batch is two batched matrix products:
no Python and no kernel launch per image, whatever the mix of sizes.

The matrices reproduce ``torch.nn.functional.interpolate`` (which torchvision's tensor resize
calls) for ``nearest``, ``nearest-exact``, ``bilinear`` and ``bicubic``, with or without
antialiasing, including its index arithmetic in float32; the centre crop (or zero padding when
the resized image is smaller than the crop) is folded into the rows. Agreement with
interpolate + center_crop is tested to float rounding (``tests/test_resize.py``).
"""

from __future__ import annotations

import warnings
from typing import Any

# torch.nested (used to pad a list of images in one call) warns that its API is a prototype
warnings.filterwarnings("ignore", message=r"The PyTorch API of nested tensors is in prototype")

MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")


def resized_lengths(h, w, size: int):
    """torchvision's rule for ``resize(size=[s])`` on (h, w) int64 tensors: the shorter side
    becomes ``s``, the longer one scales with it, truncated (computed in float64, as Python's
    ``int(s * long / short)``)."""
    import torch

    long_h = (size * h.double() / w.double()).floor().long()
    long_w = (size * w.double() / h.double()).floor().long()
    s = torch.full_like(h, size)
    return torch.where(w <= h, long_h, s), torch.where(w <= h, s, long_w)


def axis_matrix(in_len, out_len, crop: int, width: int, mode: str, antialias: bool):
    """(n, crop, width) float32: row ``o`` of image ``k`` holds the weights of output pixel
    ``o`` of the centre crop over the ``in_len[k]`` input pixels of that axis (columns past
    ``in_len[k]`` are zero: they meet the padding). ``in_len``/``out_len``: int64 (n,)."""
    import torch

    dev = in_len.device
    # centre crop: torchvision rounds (half to even, like torch.round) the offset; a resize
    # smaller than the crop is padded with zeros, (crop - out) // 2 before it
    top = torch.where(out_len >= crop, torch.round((out_len - crop).double() / 2.0).long(),
                      -((crop - out_len) // 2))
    r = torch.arange(crop, device=dev)[None, :] + top[:, None]  # resized index, (n, crop)
    inside = (r >= 0) & (r < out_len[:, None])
    scale = (in_len.float() / out_len.float())[:, None]  # interpolate's float32 arithmetic
    rf = r.float()
    j = torch.arange(width, device=dev, dtype=torch.float32)[None, None, :]
    L = in_len[:, None]
    if mode not in MODES:
        raise ValueError(f"interpolation {mode!r} is not one of {', '.join(MODES)}")
    if mode.startswith("nearest"):
        w = _nearest(rf, scale, L, j, exact=mode == "nearest-exact")
    elif antialias:
        w = _aa_weights(rf, scale, L, j, mode)
    else:
        w = (_bilinear if mode == "bilinear" else _bicubic)(rf, scale, L, width)
    return w * inside[..., None]


def _nearest(rf, scale, L, j, exact: bool):
    """interpolate's nearest (floor(r * scale)) and nearest-exact (floor((r + 0.5) * scale))."""
    import torch

    src = torch.floor((rf + 0.5) * scale if exact else rf * scale)
    src = torch.minimum(src.long(), L - 1)
    return (j.long() == src[..., None]).float()


def _bilinear(rf, scale, L, width: int):
    """interpolate's bilinear without antialiasing (half-pixel centres, clamped at 0)."""
    import torch

    src = (scale * (rf + 0.5) - 0.5).clamp_min(0)
    i0 = src.long()
    i1 = torch.minimum(i0 + 1, L - 1)
    l1 = src - i0.float()
    return _scatter(width, (i0, 1 - l1), (i1, l1))


def _bicubic(rf, scale, L, width: int):
    """interpolate's bicubic without antialiasing (Keys a = -0.75, borders clamped)."""
    import torch

    src = scale * (rf + 0.5) - 0.5
    i0 = torch.floor(src)
    t = src - i0
    i0 = i0.long()
    return _scatter(width, *[((i0 + d).clamp(min=0).minimum(L - 1), c)
                             for d, c in zip((-1, 0, 1, 2), _cubic(t, -0.75))])


def _aa_weights(rf, scale, L, j, mode: str):
    """interpolate's antialiased kernels (PIL's): a triangle (bilinear) or Keys a=-0.5 cubic
    stretched by the scale when shrinking, taps truncated as ATen does, rows normalised."""
    import torch

    interp = 2.0 if mode == "bilinear" else 4.0
    shrink = scale >= 1.0
    support = torch.where(shrink, interp * 0.5 * scale, torch.full_like(scale, interp * 0.5))
    invscale = torch.where(shrink, 1.0 / scale, torch.ones_like(scale))
    center = scale * (rf + 0.5)
    lo = torch.floor(center - support + 0.5).clamp_min(0)  # int() of a value >= 0 after max(.,0)
    hi = torch.minimum(torch.floor(center + support + 0.5), L.float())
    x = ((j - center[..., None] + 0.5) * invscale[..., None]).abs()
    if mode == "bilinear":
        f = (1.0 - x).clamp_min(0)
    else:
        a = -0.5
        f = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                        torch.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, torch.zeros_like(x)))
    f = f * ((j >= lo[..., None]) & (j < hi[..., None]))
    total = f.sum(-1, keepdim=True)
    return torch.where(total != 0, f / total, f)


def _cubic(t, a: float):
    """Keys cubic convolution coefficients of the four taps around ``t`` in [0, 1)."""
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def _scatter(width: int, *taps):
    """(n, crop, width) weights from (index, weight) pairs of (n, crop) tensors; taps on the
    same index add up (clamped borders). Rows outside the resized image may point past the
    input: clamped here, zeroed by the caller."""
    import torch

    idx0 = taps[0][0]
    w = torch.zeros((*idx0.shape, width), dtype=torch.float32, device=idx0.device)
    for idx, weight in taps:
        w.scatter_add_(-1, idx.clamp(0, width - 1)[..., None], weight[..., None].float())
    return w


def padded(images: list[Any], dtype=None):
    """uint8 CHW images of any sizes -> (n, C, Hmax, Wmax) float (``dtype``, default float32),
    zero-padded, built by torch.nested in one call (its CUDA kernel takes float16, which holds
    0..255 exactly)."""
    import torch

    dtype = dtype or torch.float32
    try:
        nt = torch.nested.as_nested_tensor(images, dtype=torch.float16)
        return torch.nested.to_padded_tensor(nt, 0.0).to(dtype)
    except torch.OutOfMemoryError:  # a smaller --batch-size, not a slower copy
        raise
    except (RuntimeError, NotImplementedError):  # an older torch: one copy per image
        h = max(int(x.shape[-2]) for x in images)
        w = max(int(x.shape[-1]) for x in images)
        out = images[0].new_zeros((len(images), images[0].shape[0], h, w), dtype=dtype)
        for k, x in enumerate(images):
            out[k, :, : x.shape[-2], : x.shape[-1]].copy_(x)
        return out


def resize_crop(images: list[Any], size: int, crop: int, mode: str, antialias: bool,
                pixels: int = 1 << 25, dtype=None):
    """uint8 CHW images of any sizes -> (n, C, crop, crop) float32 in 0..255 (not rounded):
    ``center_crop(resize(x, [size]), [crop])`` of each, in input order.

    Images go through in chunks of similar area (sorted), each padded to its largest height
    and width with at most ``pixels`` padded pixels per chunk, so one huge photo neither
    blows up the padded buffer of the whole batch nor pads small images to its size.
    ``dtype`` of the matrix products: float32 (default; equal to torchvision to float
    rounding) or float16 on a GPU (tensor cores, an order of magnitude faster; within about
    0.1 of a grey level, far below what a bf16 forward pass rounds away)."""
    import torch

    aa = antialias and mode in ("bilinear", "bicubic")  # (axis_matrix refuses unknown modes)
    shapes = [(int(t.shape[-2]), int(t.shape[-1])) for t in images]
    order = sorted(range(len(images)), key=lambda k: shapes[k][0] * shapes[k][1])
    parts = [_resize_chunk([images[k] for k in chunk], [shapes[k] for k in chunk], size, crop,
                           mode, aa, dtype or torch.float32).float()
             for chunk in _chunks(order, shapes, pixels)]
    x = parts[0] if len(parts) == 1 else torch.cat(parts)
    if order == list(range(len(images))):
        return x
    return torch.empty_like(x).index_copy_(0, torch.tensor(order, device=x.device), x)


def _chunks(order: list[int], shapes: list[tuple[int, int]], pixels: int) -> list[list[int]]:
    """Consecutive runs of ``order`` whose count x largest height x largest width stays within
    ``pixels`` (one image at least)."""
    chunks: list[list[int]] = []
    run: list[int] = []
    h = w = 0
    for k in order:
        nh, nw = max(h, shapes[k][0]), max(w, shapes[k][1])
        if run and (len(run) + 1) * nh * nw > pixels:
            chunks.append(run)
            run, nh, nw = [], shapes[k][0], shapes[k][1]
        run.append(k)
        h, w = nh, nw
    return chunks + [run]


def _resize_chunk(images: list[Any], shapes: list[tuple[int, int]], size: int, crop: int,
                  mode: str, aa: bool, dtype):
    import torch

    x = padded(images, dtype)
    h = torch.tensor([s[0] for s in shapes], device=x.device)
    w = torch.tensor([s[1] for s in shapes], device=x.device)
    rh, rw = resized_lengths(h, w, size)
    a = axis_matrix(h, rh, crop, x.shape[-2], mode, aa).to(dtype)  # (k, crop, Hmax)
    b = axis_matrix(w, rw, crop, x.shape[-1], mode, aa).to(dtype)  # (k, crop, Wmax)
    return a[:, None] @ x @ b.transpose(1, 2)[:, None]
