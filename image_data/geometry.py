"""Image and patch geometry, which the models, the augmentations and the settings all speak: an
image size as (height, width), whatever form a flag or a checkpoint gives it in."""
from typing import Sequence, Tuple, Union


def to_grid(input_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """An image size as ``(height, width)``: an int means a square. The patch grid of a model is
    this over its patch size."""
    if isinstance(input_size, int):
        return input_size, input_size
    height, width = input_size
    return int(height), int(width)
