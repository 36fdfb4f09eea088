"""Under a launcher: extract features of a 7-sample dataset, then write which samples this rank
loaded and what it gathered to knn_rank{RANK}.json in $RECORD_DIR."""
import json
import os
from pathlib import Path
from typing import List, Tuple

import torch
from torch.utils.data import Dataset

import utils
from evaluation.features import extract_features


class NumberedImages(Dataset):
    """Sample i is a 2x2 image filled with i, labelled i % 3; records what was read."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.loaded: List[int] = []

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        self.loaded.append(index)
        return torch.full((3, 2, 2), float(index)), index % 3


class MeanFeature(torch.nn.Module):
    """Features (image mean, 1): the first one names the sample."""

    num_features = 2

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        means = imgs.mean(dim=(1, 2, 3))  # (B,)
        return torch.stack([means, torch.ones_like(means)], dim=1)  # (B, 2)


if __name__ == "__main__":
    device = utils.init_distributed("cpu")
    dataset = NumberedImages(7)
    features, labels = extract_features(MeanFeature(), dataset, batch_size=2, num_workers=0, device=device,
                                        amp="none", batch_transform=lambda imgs: imgs)
    report = {"loaded": dataset.loaded, "features": features[:, 0].tolist(), "labels": labels.tolist()}
    with open(Path(os.environ["RECORD_DIR"]) / f"knn_rank{os.environ['RANK']}.json", "w") as handle:
        json.dump(report, handle)
    utils.cleanup_distributed()
