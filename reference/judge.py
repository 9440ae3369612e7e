"""The independent judge: a classifier that only ever judges, for the class accuracy of classifier-guided methods.

A classifier that guides sampling also makes its own class accuracy look good, whatever the images show; so quality
claims of classifier-guided methods report class accuracy under this judge as well as under the guiding classifier
(reference/classifier.py, the evaluation classifier of the other benches). The judge differs from it in every way
that could share its blind spots:

- architecture: residual blocks with GroupNorm and SiLU, downsampling by strided convolutions, a wider stem and a
  linear head on pooled features (the guide: a VGG-style stack with BatchNorm, ReLU and max-pooling);
- data: it is trained on the first JUDGE_TRAIN images of the Fashion-MNIST *test* split, which the guide never saw
  (the guide was trained on the train split); the rest of the test split is its held-out check;
- seed: JUDGE_SEED, not the guide's.

Plain torch; inputs are RGB in [-1, 1], [B, 3, 32, 32], as the reference model produces them.
"""

import torch
from torch import nn

JUDGE_TRAIN = 8000  # test-split images [0, JUDGE_TRAIN) train the judge; [JUDGE_TRAIN, 10000) check it
JUDGE_SEED = 1234
WIDTHS = (48, 96, 192)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
            nn.GroupNorm(8, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.skip = nn.Identity() if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Judge(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        a, b, c = WIDTHS
        self.stem = nn.Conv2d(3, a, 5, padding=2)
        self.blocks = nn.Sequential(
            ResidualBlock(a, a, 1), ResidualBlock(a, b, 2),  # 16×16
            ResidualBlock(b, b, 1), ResidualBlock(b, c, 2),  # 8×8
            ResidualBlock(c, c, 1),
        )
        self.head = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def judge_split(images: torch.Tensor, labels: torch.Tensor):
    """((train images, labels), (held-out images, labels)) of the test split."""
    return (images[:JUDGE_TRAIN], labels[:JUDGE_TRAIN]), (images[JUDGE_TRAIN:], labels[JUDGE_TRAIN:])


def load_judge(path, device: torch.device) -> Judge:
    """The judge from its weights file, in float32, in eval mode."""
    from safetensors.torch import load_file

    net = Judge()
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.to(device).eval()
