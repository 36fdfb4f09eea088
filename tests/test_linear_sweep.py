"""The fast linear probe (``--protocol sweep``) against independent facts: scikit-learn's logistic
regression on the same features, heads that never interact, a held-out split that never touches
the validation set, and on the synthetic images an MAE encoder's probe at least its k-NN accuracy."""
import json

import numpy as np
import pytest
import torch

import run_knn_eval
import run_linear_probe
from evaluation.linear_sweep import held_out_split, sweep, train_heads
from helpers import TINY_VIT

def gaussian_classes(num_samples: int, rng: np.random.Generator, centers: np.ndarray):
    labels = rng.integers(0, len(centers), num_samples)
    features = centers[labels] + rng.normal(size=(num_samples, centers.shape[1]))
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


def test_the_sweep_matches_scikit_learns_logistic_regression_within_a_point():
    """Five overlapping Gaussian classes in 16 dimensions, so the accuracy is neither 100% nor
    chance; scikit-learn's multinomial logistic regression (L2, C = 1) on standardized features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16)) * 0.8
    train, val = gaussian_classes(600, rng, centers), gaussian_classes(2000, rng, centers)
    chosen, heads = sweep(train, val, num_classes=5)
    scaler = StandardScaler().fit(train[0].numpy())
    reference = LogisticRegression(C=1.0, max_iter=5000).fit(scaler.transform(train[0].numpy()), train[1].numpy())
    expected = 100 * reference.score(scaler.transform(val[0].numpy()), val[1].numpy())
    assert 60 < expected < 99 and abs(chosen.val_acc1 - expected) <= 1.0, (chosen, expected)
    assert len(heads) == 32 and chosen.held_out_acc1 == max(head.held_out_acc1 for head in heads)


def test_each_head_trains_as_it_would_alone():
    rng = np.random.default_rng(1)
    features, labels = gaussian_classes(200, rng, rng.normal(size=(3, 8)))
    grid = dict(num_classes=3, steps=50, batch_size=64, seed=0)
    together, _ = train_heads(features, labels, lrs=torch.tensor([0.1, 1.0]),
                              weight_decays=torch.tensor([0.0, 1e-2]), **grid)
    alone, _ = train_heads(features, labels, lrs=torch.tensor([1.0, 1.0]),
                           weight_decays=torch.tensor([1e-2, 1e-2]), **grid)
    torch.testing.assert_close(together[:, 1], alone[:, 1])  # (D, H, C): the second head, either way
    assert not torch.allclose(together[:, 0], alone[:, 0])


def test_the_held_out_tenth_is_seeded_disjoint_and_drawn_from_training_only():
    fit, held = held_out_split(1000, seed=3)
    assert len(held) == 100 and len(fit) == 900 and not set(fit.tolist()) & set(held.tolist())
    assert torch.equal(held, held_out_split(1000, seed=3)[1]) and not torch.equal(held, held_out_split(1000, seed=4)[1])


def test_the_paper_protocol_warns_once_far_from_its_regime_and_not_in_it():
    assert run_linear_probe.head_movement(6.4, 7020) == pytest.approx(run_linear_probe.PAPER_HEAD_MOVEMENT)
    assert run_linear_probe.PAPER_HEAD_MOVEMENT == pytest.approx(0.001 * 6.4 * 10 * 0.5 * 7020)
    # the README's recipe on a thousand images: blr 0.1 at batch 128 is lr 0.05, 30 epochs of 7 steps
    assert run_linear_probe.head_movement(0.05, 30 * 7) < run_linear_probe.PAPER_HEAD_MOVEMENT / 1000


def test_a_small_paper_protocol_run_warns_and_names_the_sweep(tmp_path, capsys):
    run_linear_probe.main(run_linear_probe.get_args_parser().parse_args(
        TINY_VIT + ["--num_samples", "32", "--batch_size", "16", "--epochs", "1", "--warmup_epochs", "1",
                  "--output_dir", str(tmp_path)]))
    out = capsys.readouterr().out
    assert out.count("warning: --protocol mae") == 1 and "--protocol sweep" in out


def test_an_mae_encoders_sweep_reaches_at_least_its_knn_accuracy_and_reuses_its_features(pretrained_mae, tmp_path):
    data = TINY_VIT + ["--num_samples", "256", "--finetune", str(pretrained_mae)]
    knn = run_knn_eval.main(run_knn_eval.get_args_parser().parse_args(data + ["--output_dir", str(tmp_path / "k")]))
    probe_args = data + ["--protocol", "sweep", "--output_dir", str(tmp_path / "p")]
    probe = run_linear_probe.main(run_linear_probe.get_args_parser().parse_args(probe_args))
    assert probe["test_acc1"] >= max(knn["knn_acc1"].values()), (probe["test_acc1"], knn["knn_acc1"])
    logged = json.loads((tmp_path / "p" / "log.txt").read_text().splitlines()[-1])
    assert logged["test_acc1"] == probe["test_acc1"] and logged["test_acc1_best_on_val"] >= logged["test_acc1"]
    cached = sorted((tmp_path / "p" / "features").glob("features-*.pt"))
    assert [path.name.split("-")[1] for path in cached] == ["train", "val"]
    again = run_linear_probe.main(run_linear_probe.get_args_parser().parse_args(probe_args))
    assert again["test_acc1"] == probe["test_acc1"] and again["extract_s"] < probe["extract_s"]
