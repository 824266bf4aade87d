"""Make the README walk-through's inputs from real images, offline: scikit-learn's handwritten digits
written as PNG files in train/, val/ and test/ folders of class folders, plus a folder of new images
to predict, and "your own fine-tuned ResNet-50": a torchvision resnet50 trained on train/ with a plain
PyTorch loop (someone else's code, not kd's) and saved as a DDP training checkpoint
({"epoch", "state_dict": {"module.<key>": tensor}, "optimizer"}).

    python examples/walkthrough_data.py photos my_resnet50.pth

With your own images and checkpoint, skip this and use yours.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_digits

SIZE = 64  # pixels: ResNet-50's ImageNet layout works from 64 px on (its stem divides by 4)
NEW = 12  # images per class kept out of photos/ for `kd predict`


def split_of(index: int) -> str:
    """train/ 70 %, val/ 10 %, test/ 20 %, by index (the digits are in no particular order)."""
    return "test" if index % 10 < 2 else "val" if index % 10 == 2 else "train"


def write_folder(root: Path) -> None:
    """root/{train,val,test}/<digit>/NNNN.png, and the first images unlabelled in root_new/ (to predict)."""
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = np.rint(image * (255.0 / 16.0)).astype(np.uint8)
        picture = Image.fromarray(pixels).resize((SIZE, SIZE), Image.BILINEAR).convert("RGB")
        folder = root / split_of(i) / str(label) if i >= 10 * NEW else root.parent / f"{root.name}_new"
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"{i:04d}.png")


def fine_tune(root: Path, out: Path, epochs: int = 8) -> None:
    torch.manual_seed(0)
    transform = torchvision.transforms.Compose(
        [
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    data = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)  # never val/ or test/
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    model = torchvision.models.resnet50(num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=epochs * len(loader))
    for epoch in range(epochs):
        for images, labels in loader:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}: last batch loss {loss.item():.3f}")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # as DistributedDataParallel saves it
    torch.save({"epoch": epochs, "state_dict": state, "optimizer": optimizer.state_dict()}, out)


if __name__ == "__main__":
    photos, checkpoint = Path(sys.argv[1]), Path(sys.argv[2])
    write_folder(photos)
    fine_tune(photos, checkpoint)
