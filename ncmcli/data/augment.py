"""Training-time augmentation on the device, drawn on the host once per epoch: CIFAR-10+'s pad-4
crop and flip (the paper's CIFAR-10+), and torchvision's RandomResizedCrop + flip for photos. Draws come from the run's generator, so a resumed epoch draws the same."""

from __future__ import annotations

import torch


def draw_augment(batch: int, generator: torch.Generator, pad: int = 4):
    """Random draws for ``augment``: crop offsets (B,), (B,) in [0, 2*pad] and flips (B,)."""
    oy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    return oy, ox, flip


def augment(
    images: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, pad: int = 4
) -> torch.Tensor:
    """The CIFAR-10+ augmentation on a uint8 batch: zero-pad ``pad`` pixels in pixel space
    (as torchvision's RandomCrop(padding=4) does; padding after normalisation would pad with
    the mean instead), crop the original size at (oy, ox), then flip where ``flip``."""
    b, c, h, w = images.shape
    dev = images.device
    oy, ox, flip = oy.to(dev), ox.to(dev), flip.to(dev)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    rows = oy[:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = ox[:, None] + torch.arange(w, device=dev)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bidx = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


RRC_SCALE, RRC_RATIO, RRC_TRIES = (0.08, 1.0), (3 / 4, 4 / 3), 10  # torchvision's RandomResizedCrop defaults


def draw_resized_crop(batch: int, h: int, w: int, generator: torch.Generator):
    """RandomResizedCrop's boxes (B, 4) as (x1, y1, x2, y2) and flips (B,): an area share in
    [0.08, 1] and an aspect ratio in [3/4, 4/3] (log-uniform), the first of 10 tries that
    fits, else the whole image (torchvision falls back to a centre crop; for square images
    that is the whole image)."""
    area = (
        h
        * w
        * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * torch.rand(batch, RRC_TRIES, generator=generator))
    )
    lo, hi = torch.log(torch.tensor(RRC_RATIO))
    ratio = torch.exp(lo + (hi - lo) * torch.rand(batch, RRC_TRIES, generator=generator))
    cw, ch = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()
    ok = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((batch,), -1))
    u = torch.rand(batch, 2, generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    rows = torch.arange(batch)
    cw = torch.where(first >= 0, cw[rows, first.clamp_min(0)], torch.tensor(float(w)))
    ch = torch.where(first >= 0, ch[rows, first.clamp_min(0)], torch.tensor(float(h)))
    x1 = (u[:, 0] * (w - cw + 1)).floor().clamp(max=w - cw)
    y1 = (u[:, 1] * (h - ch + 1)).floor().clamp(max=h - ch)
    return torch.stack([x1, y1, x1 + cw, y1 + ch], 1), flip


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop each uint8 image to its box and resize it back to (H, W) bilinearly, all in one
    batched ``torchvision.ops.roi_align`` (one sample per output pixel: plain bilinear
    sampling at pixel centres, as torchvision's resized_crop does inside the box; on the
    outermost pixels it blends in the real neighbours instead of repeating the crop's edge),
    then flip where ``flip``."""
    from torchvision.ops import roi_align

    b, c, h, w = images.shape
    dev = images.device
    rois = torch.cat(
        [torch.arange(b, dtype=torch.float32, device=dev)[:, None], boxes.to(dev, torch.float32)], 1
    )
    out = roi_align(
        images.float(), rois, output_size=(h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True
    )
    out = torch.where(flip.to(dev)[:, None, None, None], out.flip(3), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)
