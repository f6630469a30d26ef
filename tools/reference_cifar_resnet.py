"""An independent reference for the paper's CIFAR experiment (Sec. 4.2), written from the paper's text alone and
importing nothing of this project: the 6n+2 nets with option-A (zero-padded identity) shortcuts or none (plain), He
initialization, SGD (momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 50% and 75% of the run),
4-pixel padding, random crops and flips, on MNIST-format IDX files (Fashion-MNIST). It prints one JSON line per
epoch: the running training error and the error on the test images. It is what `residual`'s runs are checked
against when they disagree with the paper (docs/reproduction.md):

    python tools/reference_cifar_resnet.py data/fashion-mnist --depth 56 --iterations 11232 [--plain] [--seed 0]
"""

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def read_idx(path: Path) -> np.ndarray:
    path = path if path.exists() else path.with_name(path.name + ".gz")
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


class Block(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.residual, self.stride, self.pad = residual, stride, outputs - inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.residual:  # option A: subsample by the stride, zero-pad the new channels
            shortcut = x[:, :, :: self.stride, :: self.stride]
            out = out + F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out)


def network(depth: int, residual: bool, channels: int, classes: int) -> nn.Module:
    n, layers, inputs = (depth - 2) // 6, [], 16
    for stage, width in enumerate((16, 32, 64)):
        for index in range(n):
            layers.append(Block(inputs, width, 2 if stage and not index else 1, residual))
            inputs = width
    model = nn.Sequential(
        nn.Conv2d(channels, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, classes),
    )
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    size = images.shape[-1]
    padded = F.pad(images, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2, len(images)), generator=generator)
    rows = (dy[:, None] + torch.arange(size))[:, :, None]
    cols = (dx[:, None] + torch.arange(size))[:, None, :]
    crops = padded[torch.arange(len(images))[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--iterations", type=int, default=11232)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (where the CPU has it natively)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    load = lambda name: torch.from_numpy(read_idx(args.root / name).copy())  # noqa: E731
    train_x, train_y = load("train-images-idx3-ubyte").unsqueeze(1), load("train-labels-idx1-ubyte").long()
    test_x, test_y = load("t10k-images-idx3-ubyte").unsqueeze(1), load("t10k-labels-idx1-ubyte").long()
    mean, std = train_x.float().mean() / 255, train_x.float().std() / 255
    normalize = lambda x: ((x.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)  # noqa: E731
    model = network(args.depth, not args.plain, 1, 10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    milestones = (args.iterations // 2, args.iterations * 3 // 4)
    per_epoch, iteration, started = len(train_x) // 128, 0, time.monotonic()
    while iteration < args.iterations:
        order, wrong, seen = torch.randperm(len(train_x), generator=generator), 0, 0
        model.train()
        for batch in order[: per_epoch * 128].view(per_epoch, 128):
            lr = 0.1 * 0.1 ** sum(iteration >= m for m in milestones)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
                logits = model(normalize(augment(train_x[batch], generator)))
            loss = F.cross_entropy(logits.float(), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            wrong, seen, iteration = (
                wrong + (logits.argmax(1) != train_y[batch]).sum().item(),
                seen + 128,
                iteration + 1,
            )
            if iteration == args.iterations:
                break
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
            test_wrong = sum(
                (model(normalize(x)).argmax(1) != y).sum().item()
                for x, y in zip(test_x.split(1000), test_y.split(1000), strict=True)
            )
        record = {"iteration": iteration, "train_error": 100 * wrong / seen, "test_error": test_wrong / 100}
        print(json.dumps({**record, "seconds": round(time.monotonic() - started)}), flush=True)


if __name__ == "__main__":
    main()
