"""Write scikit-learn's digits as a folder of PNG images in class subfolders (the ImageFolder layout).

A stand-in for a user's own images, for ``sparsify train RUN --data FOLDER``:

    python examples/digits_folder.py runs/digit-images
    sparsify train runs/mine-sr --data runs/digit-images --no-augment

Layout: FOLDER/<digit>/<index>.png, 1,797 grey images of 32x32 pixels (the 8x8 originals scaled up).
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(folder: str) -> None:
    root = Path(folder)
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        d = root / str(label)
        d.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32), Image.NEAREST).save(d / f"{i}.png")
    print(f"wrote {len(digits.target)} images in {len(set(digits.target))} class folders under {root}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/digits_folder.py FOLDER")
    main(sys.argv[1])
