"""Models a user would write, outside edgetl: factories for ``edgetl export file.py:factory``."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 60
LENGTH = 12


class TokenClassifier(nn.Module):
    """Token ids (N, L) int64 -> embedding -> GRU -> mean over time -> Linear ``head``."""

    def __init__(self, vocab: int = VOCAB, dim: int = 24, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(self.embed(ids))
        return self.head(h.mean(dim=1))


class MaskedTokens(nn.Module):
    """Token ids (N, L), 0 = padding -> embedding + learned positions -> LayerNorm -> Linear ->
    mean over the real tokens -> Linear ``head``.

    The layers after the embeddings also read the padding mask (made from the ids) and the
    position embeddings (a constant: they do not depend on the input), so ``--trainable
    bias`` needs a cut that caches two tensors: the mask and the token embeddings.
    """

    def __init__(self, vocab: int = VOCAB, length: int = LENGTH, dim: int = 16,
                 classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Embedding(length, dim)
        self.register_buffer("positions", torch.arange(length), persistent=False)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        p = self.pos(self.positions)
        keep = ids != 0
        h = torch.relu(self.mix(self.norm(self.embed(ids)) + p))
        m = keep.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0))


class SeparableCNN(nn.Module):
    """Depthwise-separable CNN on (N, 3, 32, 32) images; head ``classifier`` = Flatten + Linear."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 1),
            nn.BatchNorm2d(32), nn.ReLU6(), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TwoHeads(nn.Module):
    """A model with two Linear candidates: head detection must ask which."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x))) + self.fc(x)


def token_classifier() -> nn.Module:
    torch.manual_seed(0)
    return TokenClassifier()


def masked_tokens() -> nn.Module:
    torch.manual_seed(0)
    return MaskedTokens()


def separable_cnn() -> nn.Module:
    torch.manual_seed(0)
    return SeparableCNN()
