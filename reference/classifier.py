"""The evaluation classifier: a small CNN trained on the reference data, whose penultimate features define the
feature space of the Fréchet distance and of precision/recall, and whose predictions give class accuracy.
Plain torch; inputs are RGB in [-1, 1], [B, 3, 32, 32], as the reference model produces them."""

import torch
from torch import nn

FEATURES = 256


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class Classifier(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            _block(3, 64), nn.MaxPool2d(2),  # 16×16
            _block(64, 128), nn.MaxPool2d(2),  # 8×8
            _block(128, FEATURES), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(FEATURES, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path, num_classes: int, device: torch.device) -> Classifier:
    """The classifier from its weights file, in float32, in eval mode."""
    from safetensors.torch import load_file

    net = Classifier(num_classes)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    return net.to(device).eval()
