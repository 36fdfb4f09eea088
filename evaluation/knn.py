"""Weighted k-NN classification of frozen features, as DINO evaluates (Wu et al. 2018): the
neighbours' temperature-weighted votes, for every k from one search, queries taken in chunks so
memory stays bounded on ImageNet. ``run_knn_eval.py`` and the evaluation during pretraining
(``evaluation.online``) both classify with it, with the same defaults."""
from typing import Dict, Sequence

import torch
import torch.nn.functional as F

NB_KNN = (10, 20, 100, 200)  # neighbour counts, all evaluated in one pass
TEMPERATURE = 0.07  # votes weigh exp(cosine similarity / T)
QUERY_CHUNK = 256  # evaluation images per similarity matrix


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    ks: Sequence[int],
    temperature: float,
) -> Dict[int, torch.Tensor]:
    """Predicted class of each query for every k in ``ks`` from one nearest-neighbour search.

    Features must be L2-normalized, so the dot product is the cosine similarity. A neighbour votes
    ``exp(similarity / temperature)`` for its class; the class with the largest sum over the k
    nearest wins (Wu et al. 2018, as in DINO).
    """
    similarity = queries @ train_features.T  # (Q, N)
    top_similarity, top_index = similarity.topk(max(ks), dim=1)  # (Q, K), most similar first
    weights = (top_similarity / temperature).exp()  # (Q, K)
    votes = F.one_hot(train_labels[top_index], num_classes) * weights.unsqueeze(-1)  # (Q, K, C)
    scores = votes.cumsum(dim=1)  # (Q, K, C): row k - 1 holds the class scores of the k nearest
    return {k: scores[:, k - 1].argmax(dim=1) for k in ks}


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int],
    temperature: float,
) -> Dict[int, float]:
    """Top-1 accuracy (%) of the weighted k-NN classifier for every k, queries taken in chunks."""
    train_features, test_features = F.normalize(train_features, dim=1), F.normalize(test_features, dim=1)
    correct = {k: 0 for k in ks}
    for start in range(0, len(test_features), QUERY_CHUNK):
        chunk = slice(start, start + QUERY_CHUNK)
        predictions = knn_predict(train_features, train_labels, test_features[chunk], num_classes, ks, temperature)
        for k, predicted in predictions.items():
            correct[k] += int((predicted == test_labels[chunk]).sum())
    return {k: 100.0 * hits / len(test_labels) for k, hits in correct.items()}
