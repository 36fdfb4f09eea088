"""Make the repository's modules importable from the tests and keep torch to the CI's cores."""
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

torch.set_num_threads(min(2, torch.get_num_threads()))
