"""Training sets decoded once and held in memory, augmented by the batch on the device (issue
24): where a fine-tuning set of small images fits, epochs after the first decode nothing and
need no DataLoader. On a GPU a 32-px ResNet step takes well under a millisecond and per-image
decoding and augmentation in DataLoader workers becomes the limit; on a CPU the workers take
cores from the steps.

The images are stored as uint8 after the deterministic part of the preprocessing (resize,
centre crop: exactly what the per-image path does first); the random part is the small-image
augmentation (a shift by up to 1/8 of the side with reflect padding: torchvision's
``RandomCrop(size, padding, padding_mode="reflect")``, offsets uniform per image), drawn from
torch's global generator in the main process, so it is seeded per epoch and repeats on resume.
"""

from __future__ import annotations

from typing import Any, Iterator

MAX_SHARE = 0.25  # of the memory available on the device (or host) a decoded set may take


def fits(n: int, size: int, device: str) -> bool:
    """Whether n images of size x size (uint8, 3 channels) fit in ``MAX_SHARE`` of what is
    available on ``device`` now (unknown: no)."""
    from featurekit._resources import available_bytes

    room = available_bytes(device)
    return room is not None and n * 3 * size * size <= MAX_SHARE * room


class Decoded:
    """uint8 images (N, 3, S, S) and labels (N,) on a device, served as normalised float
    batches (channels_last); ``pad`` > 0: each training batch's images shifted at random by up
    to ``pad`` pixels (reflect padding)."""

    def __init__(self, images, labels, mean, std, pad: int = 0) -> None:
        import torch

        self.images, self.labels, self.pad = images, labels, pad
        dev = images.device
        self.mean = torch.tensor(mean, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=dev, dtype=torch.float32).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def build(cls, dataset, device: str, workers: int, mean, std, pad: int = 0) -> Decoded:
        """Decode ``dataset`` ((uint8 CHW tensor, label) pairs) once, through a DataLoader
        with ``workers``, onto ``device``."""
        import torch

        loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers)
        images = torch.zeros(0, 3, 1, 1, dtype=torch.uint8, device=device)
        labels = torch.zeros(len(dataset), dtype=torch.long, device=device)
        start = 0
        for x, y in loader:  # filled in place: the set is held once, never twice
            if start == 0:
                images = torch.empty(len(dataset), *x.shape[1:], dtype=torch.uint8, device=device)
            images[start:start + len(x)] = x.to(device)
            labels[start:start + len(x)] = y.to(device)
            start += len(x)
        return cls(images, labels, mean, std, pad)

    def batches(self, indices: list[int], batch_size: int, train: bool,
                drop_last: bool = False) -> Iterator[tuple[Any, Any]]:
        """(x, y) of ``indices`` in order, ``batch_size`` at a time; ``train``: shifted."""
        import torch

        order = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for s in range(0, stop, batch_size):
            idx = order[s:s + batch_size]
            x = self.images[idx]
            if train and self.pad:
                x = self.shifted(x)
            x = (x.float().div_(255) - self.mean) / self.std
            yield x.contiguous(memory_format=torch.channels_last), self.labels[idx]

    def shifted(self, x):
        """Each image shifted by its own random offset within ``pad`` (reflect padding), as
        RandomCrop(size, padding=pad, padding_mode="reflect") draws them."""
        import torch

        b, c, h, w = x.shape
        p = self.pad
        padded = torch.nn.functional.pad(x.float(), (p, p, p, p), mode="reflect")
        dy = torch.randint(0, 2 * p + 1, (b,)).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (b,)).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (b,1,h,1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (b,1,1,w)
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chans = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, chans, rows, cols].to(x.dtype)
