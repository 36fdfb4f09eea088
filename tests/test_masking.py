"""Random patch masks: counts follow the official MAE rounding, subsets are uniform."""
import numpy as np
import pytest
import torch

from masking_generator import RandomMaskingGenerator, random_masks


@pytest.mark.parametrize("ratio, expected_masked", [(0.75, 147), (0.9, 177)])
def test_generator_masks_the_official_count_of_196(ratio, expected_masked):
    # Official MAE keeps int(196 * (1 - ratio)) patches: 49 at 0.75, 19 at 0.9.
    mask = RandomMaskingGenerator(14, ratio)()
    assert mask.shape == (196,)
    assert mask.dtype == np.bool_
    assert int(mask.sum()) == expected_masked


def test_generator_accepts_a_rectangular_grid():
    # 7 x 10 = 70 patches, int(70 * 0.25) = 17 visible, 53 masked.
    generator = RandomMaskingGenerator((7, 10), 0.75)
    mask = generator()
    assert mask.shape == (70,)
    assert int(mask.sum()) == 53


def test_generator_ratio_zero_masks_nothing():
    assert not RandomMaskingGenerator(14, 0.0)().any()


def test_random_masks_ratio_zero_masks_nothing():
    assert not random_masks(3, 196, 0.0).any()


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_generator_refuses_ratio_outside_zero_one(ratio):
    with pytest.raises(ValueError):
        RandomMaskingGenerator(14, ratio)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_random_masks_refuses_ratio_outside_zero_one(ratio):
    with pytest.raises(ValueError):
        random_masks(2, 196, ratio)


def test_generator_masks_every_patch_equally_often():
    # 4000 draws: each patch's frequency has std sqrt(.75 * .25 / 4000) ~ 0.0068; 0.03 is > 4 std.
    np.random.seed(0)
    generator = RandomMaskingGenerator(14, 0.75)
    counts = np.sum([generator() for _ in range(4000)], axis=0)
    frequency = counts / 4000
    assert np.abs(frequency - 147 / 196).max() < 0.03


def test_random_masks_masks_every_patch_equally_often():
    generator = torch.Generator().manual_seed(0)
    masks = random_masks(4000, 196, 0.75, generator=generator)
    frequency = masks.double().mean(dim=0)
    assert (frequency - 147 / 196).abs().max() < 0.03


def test_random_masks_shape_dtype_and_count_per_row():
    masks = random_masks(8, 196, 0.75, device="cpu", generator=torch.Generator().manual_seed(1))
    assert masks.shape == (8, 196)
    assert masks.dtype == torch.bool
    assert masks.sum(dim=1).tolist() == [147] * 8


def test_random_masks_is_reproducible_from_the_generator_seed():
    first = random_masks(4, 196, 0.75, generator=torch.Generator().manual_seed(123))
    second = random_masks(4, 196, 0.75, generator=torch.Generator().manual_seed(123))
    assert torch.equal(first, second)


def test_random_masks_rows_differ():
    masks = random_masks(4, 196, 0.75, generator=torch.Generator().manual_seed(7))
    rows = {tuple(row.tolist()) for row in masks}
    assert len(rows) == 4
