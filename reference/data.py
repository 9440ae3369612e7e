"""The reference model's data: Fashion-MNIST, shipped inside Debian's `dataset-fashion-mnist` package.

No package reachable here ships labelled colour photographs (every CIFAR/STL/ImageNet package on PyPI and npm
downloads its data at run time); Fashion-MNIST is the best real labelled image set that is inside a package: 70,000
greyscale 28×28 photographs of Zalando articles in 10 classes (7,000 each), MIT licence, © 2017 Zalando SE.
Debian package `dataset-fashion-mnist`, version 0.0~git20200523.55506a9-1 (bookworm), files under
/usr/share/datasets/fashion-mnist/ in the IDX format. Images are padded to 32×32 and repeated to RGB, so the model
works in ComfyUI's 3-channel pixel space.
"""

import gzip
import pathlib
import subprocess
import tempfile

import numpy as np

PACKAGE = "dataset-fashion-mnist"
PACKAGE_PATH = "usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
RESOLUTION = 32


def ensure_fashion_mnist(folder: pathlib.Path, splits=tuple(FILES)) -> pathlib.Path:
    """The folder holding the IDX files of `splits`, unpacked from the Debian package into `folder` (all four files)
    if they are not there yet."""
    folder = pathlib.Path(folder)
    if all((folder / name).is_file() for split in splits for name in FILES[split]):
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        download = ["apt-get", "download", PACKAGE]
        if subprocess.run(download, cwd=tmp, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            subprocess.run(download, cwd=tmp, check=True, capture_output=True)
        deb = next(pathlib.Path(tmp).glob("*.deb"))
        unpacked = pathlib.Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        folder.mkdir(parents=True, exist_ok=True)
        for pair in FILES.values():
            for name in pair:
                (folder / name).write_bytes((unpacked / PACKAGE_PATH / name).read_bytes())
    return folder


def _idx(path: pathlib.Path, header: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


def load_split(folder: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 32, 32, 3], labels int64 [N]) of the 'train' (60k) or 'test' (10k) split."""
    images_file, labels_file = FILES[split]
    images = _idx(pathlib.Path(folder) / images_file, 16).reshape(-1, 28, 28)
    labels = _idx(pathlib.Path(folder) / labels_file, 8).astype(np.int64)
    pad = (RESOLUTION - 28) // 2
    images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    return np.repeat(images[..., None], 3, axis=-1), labels
