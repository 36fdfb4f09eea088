"""Random patch masks: counts follow the official MAE rounding, subsets are uniform."""
import pytest
import torch

from masking_generator import random_masks


@pytest.mark.parametrize("num_patches, ratio, expected_masked", [(196, 0.75, 147), (196, 0.9, 177), (70, 0.75, 53)])
def test_random_masks_mask_the_official_count_in_every_row(num_patches, ratio, expected_masked):
    # Official MAE keeps int(N * (1 - ratio)) patches: 49 of 196 at 0.75, 19 at 0.9, 17 of 70 (a 7 x 10 grid).
    masks = random_masks(8, num_patches, ratio, device="cpu", generator=torch.Generator().manual_seed(1))
    assert masks.shape == (8, num_patches)
    assert masks.dtype == torch.bool
    assert masks.sum(dim=1).tolist() == [expected_masked] * 8


def test_random_masks_ratio_zero_masks_nothing():
    assert not random_masks(3, 196, 0.0).any()


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_random_masks_refuses_ratio_outside_zero_one(ratio):
    with pytest.raises(ValueError):
        random_masks(2, 196, ratio)


def test_random_masks_masks_every_patch_equally_often():
    # 4000 rows: each patch's frequency has std sqrt(.75 * .25 / 4000) ~ 0.0068; 0.03 is > 4 std.
    generator = torch.Generator().manual_seed(0)
    masks = random_masks(4000, 196, 0.75, generator=generator)
    frequency = masks.double().mean(dim=0)
    assert (frequency - 147 / 196).abs().max() < 0.03


def test_random_masks_is_reproducible_from_the_generator_seed():
    first = random_masks(4, 196, 0.75, generator=torch.Generator().manual_seed(123))
    second = random_masks(4, 196, 0.75, generator=torch.Generator().manual_seed(123))
    assert torch.equal(first, second)


def test_random_masks_rows_differ():
    masks = random_masks(4, 196, 0.75, generator=torch.Generator().manual_seed(7))
    rows = {tuple(row.tolist()) for row in masks}
    assert len(rows) == 4
