"""Device-side batches (ncmcli/data/batching.py, augment.py): normalisation and flips."""

import pytest
import torch


def test_global_normalisation_is_one_mean_and_std_over_all_channels():
    from ncmcli.data.batching import channel_stats

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 8, 8), generator=g, dtype=torch.uint8)
    images[:, 0] //= 4  # channels with different statistics
    mean, std = channel_stats(images, per_channel=False)
    x = images.double() / 255
    assert mean == pytest.approx([x.mean().item()] * 3) and std == pytest.approx([x.std().item()] * 3)
    per = channel_stats(images)
    assert per[0][0] == pytest.approx(x[:, 0].mean().item()) and per[0][0] != pytest.approx(mean[0])


def test_flip_only_batches_mirror_or_keep_each_image():
    from ncmcli.data.batching import Split, batches

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 6, 6), generator=g, dtype=torch.uint8)
    split = Split(images, torch.arange(64))
    flipped = kept = 0
    for x, y in batches(
        split,
        16,
        mean=[0.0],
        std=[1 / 255],
        device="cpu",
        generator=torch.Generator().manual_seed(1),
        flip_batches=True,
    ):
        for xi, yi in zip(x, y):
            orig = images[yi].float()
            if torch.equal(xi, orig):
                kept += 1
            else:
                assert torch.equal(xi, orig.flip(-1))
                flipped += 1
    assert flipped > 10 and kept > 10
