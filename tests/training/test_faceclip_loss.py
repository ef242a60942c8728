"""The sigmoid contrastive loss on known embeddings: matched vs shuffled, repeated identities."""

from __future__ import annotations

import math

import torch

from training.faceclip.loss import SpaceAlignment, pair_targets, sigmoid_loss

SCALE = torch.tensor(math.log(1 / 0.07))
BIAS = torch.tensor(-10.0)


def _embeddings(n: int, d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_matched_pairs_cost_less_than_shuffled_ones():
    z = _embeddings(8)
    labels, weights = pair_targets([str(i) for i in range(8)], "positive")
    matched = sigmoid_loss(z, z + 0.05 * _embeddings(8, seed=1), SCALE, BIAS, labels, weights)
    shuffled = sigmoid_loss(z, z.roll(1, dims=0), SCALE, BIAS, labels, weights)
    assert matched < 0.5 * shuffled
    # A perfect match has logit 1/0.07 - 10 = 4.29: it costs log(1 + e^-4.29) per sample,
    # and the near-orthogonal negatives (logit about -10) almost nothing.
    exact = sigmoid_loss(z, z, SCALE, BIAS, labels, weights)
    assert abs(float(exact) - math.log1p(math.exp(-(1 / 0.07 - 10)))) < 0.005


def test_pair_targets_for_repeated_identities():
    labels, weights = pair_targets(["a", "b", "a", ""], "positive")
    assert labels.tolist() == [
        [1, -1, 1, -1],
        [-1, 1, -1, -1],
        [1, -1, 1, -1],
        [-1, -1, -1, 1],  # an unknown identity matches only itself
    ]
    assert weights.eq(1).all()
    labels, weights = pair_targets(["a", "b", "a", ""], "ignore")
    assert labels.tolist() == (torch.eye(4) * 2 - 1).tolist()
    assert weights.tolist() == [[1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]


def test_repeated_identities_are_not_negatives():
    # Samples 0 and 1 show the same person: their face-space targets are (nearly) the same.
    person = _embeddings(1, seed=3)
    targets = torch.cat([person, person + 0.01 * _embeddings(1, seed=4), _embeddings(2, seed=5)])
    joint = targets.clone()
    as_negatives = sigmoid_loss(
        joint, targets, SCALE, BIAS, *pair_targets(["a", "b", "c", "d"], "positive")
    )
    as_positives = sigmoid_loss(
        joint, targets, SCALE, BIAS, *pair_targets(["a", "a", "c", "d"], "positive")
    )
    ignored = sigmoid_loss(
        joint, targets, SCALE, BIAS, *pair_targets(["a", "a", "c", "d"], "ignore")
    )
    assert as_positives < 0.2 * as_negatives
    assert ignored < 0.2 * as_negatives
    # Ignoring removes exactly the two cross pairs from the sum.
    labels, _ = pair_targets(["a", "b", "c", "d"], "positive")
    logits = (
        SCALE.exp()
        * torch.nn.functional.normalize(joint, dim=-1)
        @ torch.nn.functional.normalize(targets, dim=-1).T
        + BIAS
    )
    cross = -torch.nn.functional.logsigmoid(labels * logits)[[0, 1], [1, 0]].sum() / 4
    assert torch.isclose(as_negatives - ignored, cross, atol=1e-5)


def test_space_alignment_learns_its_head_scale_and_bias():
    torch.manual_seed(0)
    space = SpaceAlignment(joint_dim=24, target_dim=16, same_identity="positive")
    assert torch.isclose(space.logit_scale, SCALE) and space.logit_bias.item() == -10.0
    joint, target = _embeddings(6, 24, seed=6), _embeddings(6, 16, seed=7)
    identities = ["a", "a", "b", "c", "d", "e"]
    optimizer = torch.optim.Adam(space.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        loss = space(joint, target, identities)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3 * first
    assert space.logit_bias.item() != -10.0
