"""What the synthetic dataset shows, shared by its writers: the words, the scene and its drawing.

A leaf of `services.trainer.synth`: `synth` (images, conversations, scoring), `_synth_media`
(video, audio, event and timed-video generators) and `_synth_outputs` (text-to-X captions) all
draw their words from here and import nothing of each other back, so the dependencies go one way
(synth -> _synth_media, _synth_outputs -> _synth_scene). What belongs here:

- the vocabulary: shape colours, backgrounds, shapes, directions of motion, tone pitches;
- `Scene` (one coloured shape on a plain background) and `draw`, which renders it with PIL
  (the images and every frame of the videos);
- the seed offset of held-out items and the timing of the timed videos (length, frames per
  second, shortest visible span), which the generators write and the conversations ask about.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right")
PITCHES: dict[str, float] = {"low": 220.0, "medium": 440.0, "high": 880.0}  # Hz
HELDOUT_SEED_OFFSET = 1_000_003  # held-out items come from seed + this
TIMED_SECONDS = 8  # timed videos: length, frames per second, visible span of the shape
TIMED_FPS = 2
TIMED_MIN_VISIBLE = 2


@dataclass(frozen=True)
class Scene:
    """What one image shows; `box` is (left, top, side) of the shape in pixels."""

    color: str
    shape: str
    background: str
    box: tuple[int, int, int]


def draw(scene: Scene, image_size: int) -> Image.Image:
    """Render a scene as an RGB image of `image_size` pixels square."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
    pen = ImageDraw.Draw(image)
    left, top, side = scene.box
    right, bottom = left + side - 1, top + side - 1
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        pen.ellipse((left, top, right, bottom), fill=fill)
    elif scene.shape == "square":
        pen.rectangle((left, top, right, bottom), fill=fill)
    else:
        pen.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=fill)
    return image
