from __future__ import annotations

from typing import Sequence

from torch import nn


class MLP(nn.Sequential):
    """Linear -> ReLU (-> Dropout) blocks; ``output_dim`` appends a final plain Linear."""

    def __init__(self, input_dim: int, hidden: Sequence[int], output_dim: int | None = None, dropout: float = 0.0,
                 activation: type[nn.Module] = nn.ReLU):
        layers: list[nn.Module] = []
        d = input_dim
        for h in hidden:
            layers += [nn.Linear(d, h), activation()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        if output_dim is not None:
            layers.append(nn.Linear(d, output_dim))
            d = output_dim
        super().__init__(*layers)
        self.output_dim = d
