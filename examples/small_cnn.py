"""A model as a user writes it: conv-bn-relu blocks, one residual add, a flatten -> linear head.

sparsify finds it by ``build_model()`` (or the file's only nn.Module with a no-argument
constructor) and its input shape by ``INPUT_SHAPE``:

    sparsify inspect examples/small_cnn.py
    sparsify transform examples/small_cnn.py --density 0.2 --out runs/mine-sr
"""
import torch
import torch.nn as nn

INPUT_SHAPE = (1, 1, 28, 28)


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(nn.Module):
    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, width)
        self.conv1 = conv_bn(width, width)
        self.conv2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 14 * 14, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.conv2(self.conv1(x)))  # the residual add
        return self.head(self.pool(x))


def build_model(width: int = 32, num_classes: int = 10) -> nn.Module:
    return SmallCNN(width, num_classes)
