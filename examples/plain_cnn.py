"""A plain CNN as many tutorials write it: three convs with biases and no BatchNorm, two max-pools,
one linear. Without BatchNorm it is the model that diverged under SGD at lr 0.1 before training
had a warm-up and gradient clipping by default (issue 11):

    sparsify run examples/plain_cnn.py --data digits
"""
import torch
import torch.nn as nn

INPUT_SHAPE = (1, 1, 28, 28)


class PlainCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(64 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))
