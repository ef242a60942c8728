"""Sigmoid contrastive loss (SigLIP) between FaceCLIP's joint embedding and a target space.

Every (joint i, target j) pair of a batch is an independent binary problem: logit
`exp(scale) * cos(z_i, t_j) + bias`, label +1 for a positive and -1 for a negative, loss
`-log sigmoid(label * logit)` summed over pairs and divided by the batch size. The scale starts
at log(1/0.07) and the bias at -10 (the released encoder's values), both learnable; the strong
negative bias keeps the many negatives from dominating the first steps.

Positives are the diagonal (sample i's joint embedding and sample i's target). Identity-aware
batches repeat identities (the loader pairs a reference face with a target of the same person),
so two samples of one identity are never negatives of each other:
- in the face space (targets: identity features of the reference faces) they are positives,
  since their targets describe the same person; this is what makes one identity's joint
  embeddings cluster;
- in the text and image spaces (targets: a caption, a photo) they are left out of the loss:
  another photo or caption of the same person is neither the sample's own target nor a
  different person.
Identities that are empty strings are unknown and match nothing but themselves.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

SameIdentity = Literal["positive", "ignore"]


def pair_targets(
    identities: list[str], same_identity: SameIdentity, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (B, B) in {+1, -1} and weights (B, B) in {0, 1} for one batch."""
    n = len(identities)
    eye = torch.eye(n, dtype=torch.bool, device=device)
    codes = {name: i for i, name in enumerate(dict.fromkeys(identities))}
    ids = torch.tensor([codes[x] for x in identities], device=device)
    known = torch.tensor([bool(x) for x in identities], device=device)
    same = (ids[:, None] == ids[None, :]) & known[:, None] & known[None, :] & ~eye
    if same_identity == "positive":
        labels, weights = eye | same, torch.ones(n, n, device=device)
    else:
        labels, weights = eye, (~same).float()
    return labels.float() * 2 - 1, weights


def sigmoid_loss(
    z: torch.Tensor,
    t: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP loss of embeddings z (B, D) against targets t (B, D); both are L2-normalised here."""
    z, t = F.normalize(z.float(), dim=-1), F.normalize(t.float(), dim=-1)
    logits = logit_scale.exp() * z @ t.T + logit_bias
    losses = -F.logsigmoid(labels * logits)
    if weights is not None:
        losses = losses * weights
    return losses.sum() / len(z)


class SpaceAlignment(nn.Module):
    """One target space: a linear head from the joint embedding into it, and its learnable
    logit scale and bias."""

    def __init__(
        self,
        joint_dim: int,
        target_dim: int,
        same_identity: SameIdentity,
        logit_scale: float = math.log(1 / 0.07),
        logit_bias: float = -10.0,
    ):
        super().__init__()
        self.head = nn.Linear(joint_dim, target_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias)))
        self.same_identity = same_identity

    def forward(
        self, joint: torch.Tensor, target: torch.Tensor, identities: list[str]
    ) -> torch.Tensor:
        labels, weights = pair_targets(identities, self.same_identity, joint.device)
        return sigmoid_loss(
            self.head(joint), target, self.logit_scale, self.logit_bias, labels, weights
        )
