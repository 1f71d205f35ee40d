"""The embedded default data set: "synthetic", procedurally generated shapes filled with striped textures.

It needs no download and no files, comes out the same for the same seed, and takes about a second to generate.
It is built for the situation region-aware convolution is meant for: what an image shows depends on *where* things
are, because the label is carried by one region of the image (an object) while the rest holds clutter made of the
same textures.

How an image is generated (32 x 32 RGB; images are made in chunks of 500, every random draw of a chunk coming from
one ``torch.Generator`` seeded from the data set seed, the split and the chunk's index):

1. Background: a linear colour gradient between two random colours in a random direction.
2. Clutter: three small squares (side 4 to 7 px) at random places, each filled with stripes of a random
   orientation (near-horizontal or near-vertical), period and pair of colours.
3. The object, drawn on top: one of five shapes (disc, square, triangle, ring, cross) with a random centre,
   size (radius 8 to 12 px) and rotation (+-30 degrees), filled with stripes that are either near-horizontal or
   near-vertical (+-20 degrees), of random period (3 to 5 px), phase and pair of contrasting colours.
4. Gaussian pixel noise (sigma 0.04 on a 0..1 scale), then quantisation to uint8.

The label is (shape, stripe orientation): 5 x 2 = 10 balanced classes. Colour carries no information, and both
stripe orientations appear in the clutter, so a model must find the object and read the texture *inside* it.
The held-out "test" split is drawn from the same distribution with other generator seeds, so no image is shared.
The first n images of a set are the same whatever its size, so a small run trains on a prefix of a large one.
A horizontal flip keeps every label (all shapes and orientations are mirror-symmetric in distribution).

>>> data = generate(20, seed=0)
>>> data.images.shape, data.classes[:2]
(torch.Size([20, 3, 32, 32]), ('disc, horizontal stripes', 'disc, vertical stripes'))
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from drbench.data.dataset import SPLITS, ImageDataset
from drbench.data.registry import register_dataset

SHAPES = ("disc", "square", "triangle", "ring", "cross")
ORIENTATIONS = ("horizontal", "vertical")
CLASSES = tuple(f"{shape}, {orientation} stripes" for shape in SHAPES for orientation in ORIENTATIONS)
IMAGE_SIZE = 32
TRAIN_IMAGES = 4_000
TEST_IMAGES = 1_000
CLUTTER_PATCHES = 3
NOISE_STD = 0.04


@register_dataset(
    "synthetic",
    "embedded default: 10 classes of striped shapes among striped clutter, 32x32 RGB, generated from the seed",
    options=("num_images",),
)
def load_synthetic(path: Path | None, split: str, seed: int, num_images: int | None = None) -> ImageDataset:
    """``num_images`` defaults to 4,000 for "train" and 1,000 for "test"."""
    default = TRAIN_IMAGES if split == "train" else TEST_IMAGES
    return generate(num_images or default, seed=seed * len(SPLITS) + SPLITS.index(split), split=split)


def generate(num_images: int, seed: int, split: str = "train") -> ImageDataset:
    """``num_images`` images, a pure function of the seed: the first n of a larger set are the same images.

    Images are made in chunks of 500, each from its own generator seeded by (seed, chunk), with balanced labels
    within each chunk; rendering a chunk at a time also keeps the working set in cache.
    """
    if num_images < 1:
        raise ValueError(f"synthetic: num_images must be at least 1, got {num_images}")
    images, labels = [], []
    for chunk in range(math.ceil(num_images / _CHUNK)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        chunk_labels = (torch.arange(_CHUNK) % len(CLASSES))[torch.randperm(_CHUNK, generator=generator)]
        images.append(_render(_draw_scenes(chunk_labels, generator), generator))
        labels.append(chunk_labels)
    return ImageDataset(
        "synthetic", split, torch.cat(images)[:num_images], torch.cat(labels)[:num_images], CLASSES, hflip=True
    )


_CHUNK = 500
_LAYERS = 1 + CLUTTER_PATCHES  # layer 0 is the object, drawn over clutter patches 1..4


def _draw_scenes(labels: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every random parameter of every image, as (N, ...) tensors: what to draw, before drawing it."""
    n = labels.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    clutter_vertical = torch.randint(0, 2, (n, CLUTTER_PATCHES), generator=generator)
    first_colour = uniform(0, 1, n, _LAYERS, 3)
    return {
        "shape": labels // len(ORIENTATIONS),
        "background_angle": uniform(0, 2 * math.pi, n, 1, 1),
        "background_start": uniform(0, 1, n, 3, 1, 1),
        "background_end": uniform(0, 1, n, 3, 1, 1),
        "clutter_centre": uniform(0, IMAGE_SIZE, n, CLUTTER_PATCHES, 2),
        "clutter_half_side": uniform(2, 3.5, n, CLUTTER_PATCHES),
        "object_centre": uniform(10, 22, n, 2),
        "object_radius": uniform(8, 12, n),
        "object_turn": uniform(-math.pi / 6, math.pi / 6, n),
        # stripes of each layer: orientation (the label's for the object), jitter, period, phase, two colours
        "stripe_angle": torch.cat([(labels % len(ORIENTATIONS)).view(n, 1), clutter_vertical], 1) * (math.pi / 2)
        + uniform(-math.pi / 9, math.pi / 9, n, _LAYERS),
        "stripe_period": uniform(3, 5, n, _LAYERS),
        "stripe_phase": uniform(0, 2 * math.pi, n, _LAYERS),
        "stripe_first": first_colour,
        "stripe_second": (first_colour + 0.5 + uniform(-0.15, 0.15, n, _LAYERS, 3)) % 1.0,
    }


def _render(s: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """uint8 (n, 3, H, W) images of the scenes ``s``; the pixel noise comes from ``generator``."""
    n = s["shape"].shape[0]
    rows, cols = _pixel_grid()

    angle = s["background_angle"]
    ramp = ((cols - IMAGE_SIZE / 2) * angle.cos() + (rows - IMAGE_SIZE / 2) * angle.sin()) / IMAGE_SIZE + 0.5
    start, end = s["background_start"], s["background_end"]
    background = start + (end - start) * ramp.unsqueeze(1)

    # which layer covers each pixel (-1: background); later layers paint over earlier ones, the object last
    layer = torch.full((n, IMAGE_SIZE, IMAGE_SIZE), -1, dtype=torch.long)
    for patch in range(CLUTTER_PATCHES):
        centre = s["clutter_centre"][:, patch].view(n, 2, 1, 1)
        half = s["clutter_half_side"][:, patch].view(n, 1, 1)
        # a square is a row band times a column band: test (n, H, 1) and (n, 1, W), combine once
        inside = ((rows - centre[:, 0]).abs() <= half) & ((cols - centre[:, 1]).abs() <= half)
        layer = torch.where(inside, 1 + patch, layer)
    layer = torch.where(_object_mask(s, rows, cols), 0, layer)
    covering = layer.clamp(min=0).view(n, -1)

    def per_pixel(values: torch.Tensor) -> torch.Tensor:  # (n, layers) -> (n, H, W), the covering layer's value
        return values.gather(1, covering).view(n, IMAGE_SIZE, IMAGE_SIZE)

    def per_pixel_colour(values: torch.Tensor) -> torch.Tensor:  # (n, layers, 3) -> (n, 3, H, W)
        index = covering.unsqueeze(2).expand(-1, -1, 3)
        return values.gather(1, index).transpose(1, 2).reshape(n, 3, IMAGE_SIZE, IMAGE_SIZE)

    # stripes = sign of a plane wave: its spatial frequency along rows and columns comes from angle and period
    frequency = 2 * math.pi / s["stripe_period"]
    wave = (
        rows * per_pixel(frequency * s["stripe_angle"].cos())
        + cols * per_pixel(frequency * s["stripe_angle"].sin())
        + per_pixel(s["stripe_phase"])
    )
    on = (torch.sin(wave) > 0).unsqueeze(1)
    stripes = torch.where(on, per_pixel_colour(s["stripe_first"]), per_pixel_colour(s["stripe_second"]))
    image = torch.where((layer >= 0).unsqueeze(1), stripes, background)
    image = image + NOISE_STD * torch.randn(image.shape, generator=generator)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def _pixel_grid() -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    return centres.view(1, -1, 1), centres.view(1, 1, -1)


def _object_mask(s: dict[str, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(n, H, W): the pixels inside each image's object, each image tested against its own shape only."""
    n = s["shape"].shape[0]
    centre = s["object_centre"].view(n, 2, 1, 1)
    radius, turn = s["object_radius"].view(n, 1, 1), s["object_turn"].view(n, 1, 1)
    dr, dc = rows - centre[:, 0], cols - centre[:, 1]
    u = (dc * turn.cos() + dr * turn.sin()) / radius  # object-frame coordinates in units of the radius
    v = (dr * turn.cos() - dc * turn.sin()) / radius
    mask = torch.zeros(n, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    for index, name in enumerate(SHAPES):
        chosen = s["shape"] == index
        mask[chosen] = _shape_mask(name, u[chosen], v[chosen])
    return mask


def _shape_mask(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Points (u, v), in units of the object's radius, that lie inside shape ``name``."""
    if name == "disc":
        return u * u + v * v <= 0.9**2
    if name == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.75
    if name == "triangle":  # apex up at v = -1, base at v = 0.7
        return (v >= -1) & (v <= 0.7) & (u.abs() <= 0.6 * (v + 1))
    if name == "ring":
        squared = u * u + v * v
        return (squared >= 0.55**2) & (squared <= 1.0)
    if name == "cross":
        return ((u.abs() <= 0.33) & (v.abs() <= 1)) | ((v.abs() <= 0.33) & (u.abs() <= 1))
    raise ValueError(f"unknown shape {name!r}; expected one of: {', '.join(SHAPES)}")
