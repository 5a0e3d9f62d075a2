"""ncmcli/data/augment.py's RandomResizedCrop on batched tensors, against a per-image bilinear
resize and torchvision's ranges, and as a config value that trains."""

import pytest
import torch

from ncmcli.config.presets import resolve
from ncmcli.data.augment import draw_resized_crop, resized_crop
from ncmcli.data.batching import batches
from ncmcli.errors import ConfigError


def test_resized_crop_matches_a_per_image_bilinear_resize():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8, generator=g)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [4.0, 2.0, 12.0, 10.0], [3.0, 5.0, 11.0, 15.0]])
    out = resized_crop(images, boxes, torch.tensor([False, False, True]))
    assert torch.equal(out[0], images[0])  # the whole image, unflipped: unchanged
    for i in (1, 2):  # naive reference: crop, then bilinear resize (pixel centres), then flip
        x1, y1, x2, y2 = boxes[i].long().tolist()
        crop = images[i : i + 1, :, y1:y2, x1:x2].float()
        ref = torch.nn.functional.interpolate(crop, size=(16, 16), mode="bilinear", align_corners=False)
        if i == 2:
            ref = ref.flip(3)
        # Inside the border they agree to rounding; on the outermost output pixels roi_align
        # blends in the real pixels just outside the box where a crop-then-resize repeats the
        # crop's edge (a sub-pixel difference in where the box ends).
        assert (out[i].float() - ref[0].round())[:, 1:-1, 1:-1].abs().max() <= 1, i


def test_resized_crop_draws_follow_torchvisions_ranges():
    g = torch.Generator().manual_seed(1)
    boxes, flip = draw_resized_crop(4000, 32, 24, g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 24).all() and (boxes[:, 3] <= 32).all())
    area = w * h / (32 * 24)
    assert area.min() >= 0.07 and area.max() <= 1.0
    ratio = w / h
    fitted = area < 1
    assert ratio[fitted].min() >= 3 / 4 - 0.1 and ratio[fitted].max() <= 4 / 3 + 0.1  # rounding to pixels
    assert 0.45 < flip.float().mean() < 0.55
    # Seeded: the same generator state draws the same boxes.
    a = draw_resized_crop(8, 32, 32, torch.Generator().manual_seed(5))[0]
    assert torch.equal(a, draw_resized_crop(8, 32, 32, torch.Generator().manual_seed(5))[0])


@pytest.mark.slow
def test_randomresizedcrop_is_a_config_value_and_trains(tmp_path, ncm):
    assert resolve("quickstart", ["data.augment=randomresizedcrop"]).data.augment == "randomresizedcrop"
    assert resolve("quickstart", ["data.augment=true"]).data.augment is True
    with pytest.raises(ConfigError, match="expected bool .true or false. or randomresizedcrop"):
        resolve("quickstart", ["data.augment=cutout"])
    from ncmcli.data.batching import Split

    split = Split(torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8), torch.arange(10))
    a = [
        x
        for x, _ in batches(
            split,
            5,
            mean=[0.5],
            std=[0.2],
            device="cpu",
            generator=torch.Generator().manual_seed(0),
            augment_batches="randomresizedcrop",
        )
    ]
    plain = [
        x
        for x, _ in batches(
            split, 5, mean=[0.5], std=[0.2], device="cpu", generator=torch.Generator().manual_seed(0)
        )
    ]
    assert a[0].shape == plain[0].shape and not torch.equal(a[0], plain[0])
    proc = ncm(
        "train",
        "--preset",
        "quickstart",
        "--set",
        "data.augment=randomresizedcrop",
        "--set",
        "train.epochs=1",
        "--set",
        "data.limit_train=200",
        "--set",
        "data.limit_test=50",
        "--out",
        tmp_path / "run",
    )
    assert proc.returncode == 0, proc.stderr
