"""Image folders: which users there are, which files belong to each, and the tokenizer's preprocessing."""
import random
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.errors import PipelineError
from common.pixels import to_uint8

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLIT_SEED = 0          # the 80/20 split of an unsplit folder must be the same every run
VAL_FRACTION = 0.2


#################################################################################
#                                User folders                                   #
#################################################################################

@dataclass
class User:
    """One person: the folder name, the user number in it, and the image files per split."""
    name: str
    number: int
    files: dict[str, list[Path]] = field(default_factory=dict)


def user_number(folder_name: str) -> int | None:
    """The number in a folder name (ID_7 -> 7, id03 -> 3, user-12 -> 12); None when there is none."""
    digits = re.findall(r"\d+", folder_name)
    return int(digits[-1]) if digits else None


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def _user_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def number_users(names: list[str], log=print) -> dict[str, int]:
    """Map folder name -> user number. Users are ordered by that number (ID_2 before ID_10)."""
    numbers = {name: user_number(name) for name in names}
    if any(n is None for n in numbers.values()):
        log(f"note: some user folders have no number in their name ({', '.join(n for n, v in numbers.items() if v is None)}); "
            "users are numbered 1..N by sorted folder name instead")
        return {name: i + 1 for i, name in enumerate(sorted(names))}
    seen: dict[int, str] = {}
    for name, number in numbers.items():
        if number in seen:
            raise PipelineError(f"two user folders carry the same user number {number}: "
                                f"'{seen[number]}' and '{name}'. Rename or merge one of them.")
        seen[number] = name
    return numbers


def scan_dataset(data_dir: str | Path, log=print, hold_out_val: bool = True) -> list[User]:
    """Find users and their train/val images under `data_dir`, ordered by user number.

    Layout A: data_dir/train/<user>/*.png and data_dir/val/<user>/*.png.
    Layout B: data_dir/<user>/*.png, split 80/20 per user with a fixed seed.
    With no val image at all (an empty val/, or users of 1-2 images in layout B) and hold_out_val, ~20% of each
    user's train images (at least one, from users with two or more) become val, with a note. Raises
    PipelineError for a layout it cannot use, saying what to change.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise PipelineError(f"--data_dir not found: {root}. Point it at a folder holding train/ and val/ "
                            "(each with one folder per user, e.g. ID_1, ID_2) or the user folders directly.")
    if (root / "train").is_dir():
        splits = {"train": root / "train", "val": root / "val"}
        if not splits["val"].is_dir():
            raise PipelineError(f"{root} has train/ but no val/. Add val/ with the same user folders.")
        per_split = {s: {p.name: list_images(p) for p in _user_folders(d)} for s, d in splits.items()}
        names = sorted(set(per_split["train"]) | set(per_split["val"]))
        if not names:
            raise PipelineError(f"{root}/train has no user folders. Expected e.g. {root}/train/ID_1/*.png")
        missing = [n for n in names if n not in per_split["train"]]
        if missing:
            raise PipelineError(f"user folder(s) {', '.join(missing)} are in val/ but not in train/.")
        files = {n: {s: per_split[s].get(n, []) for s in splits} for n in names}
    else:
        folders = _user_folders(root)
        if not any(list_images(p) for p in folders):
            raise PipelineError(f"{root} has neither train/ nor user folders with images "
                                f"({', '.join(IMAGE_EXTENSIONS)}). Expected {root}/train/ID_1/*.png or {root}/ID_1/*.png")
        log(f"note: {root} has no train/ and val/; splitting each user's images 80/20 (seed {SPLIT_SEED})")
        files = {p.name: _split(list_images(p)) for p in folders}
        names = sorted(files)
    numbers = number_users(names, log)
    users = [User(n, numbers[n], files[n]) for n in names]
    users.sort(key=lambda u: u.number)
    for user in users:
        if not user.files["train"]:
            where = "train/" if (root / "train").is_dir() else str(root)
            raise PipelineError(f"user folder '{user.name}' has no images ({', '.join(IMAGE_EXTENSIONS)}) "
                                f"in {where}. Add images or remove the folder.")
    if hold_out_val and not any(u.files["val"] for u in users):
        _hold_out_val(users, root, log)
    return users


def _hold_out_val(users: list[User], root: Path, log=print) -> None:
    """No val image anywhere (an empty val/, or users of 1-2 images): move a seeded ~20% (at least one) of each
    user's train images with two or more to val, so stage 2 can validate and stage 4 score unseen images.
    Every stage calls scan_dataset, so they all see the same split. Raises PipelineError when no user has two."""
    for user in users:
        files = user.files["train"]
        if len(files) >= 2:
            n_val = max(1, int(round(len(files) * VAL_FRACTION)))
            shuffled = random.Random(SPLIT_SEED).sample(files, len(files))
            user.files = {"train": sorted(shuffled[n_val:]), "val": sorted(shuffled[:n_val])}
    held = sum(len(u.files["val"]) for u in users)
    if not held:
        raise PipelineError(f"{root} has no val images and every user has a single image, so nothing can be held "
                            "out to validate the generator or score it on unseen images. Add a second image to "
                            "at least one user (in val/ or beside the first).")
    where = "val/ is empty" if (root / "train").is_dir() else "the 80/20 split left no val image (users of 1-2 images)"
    log(f"note: {where}; holding out {held} train image(s) as val ({sum(bool(u.files['val']) for u in users)} "
        f"of {len(users)} users, seed {SPLIT_SEED}). Put images in val/ to choose them yourself.")


def _split(files: list[Path]) -> dict[str, list[Path]]:
    files = list(files)
    random.Random(SPLIT_SEED).shuffle(files)
    n_val = int(round(len(files) * VAL_FRACTION)) if len(files) > 1 else 0
    return {"train": sorted(files[n_val:]), "val": sorted(files[:n_val])}


#################################################################################
#                                Preprocessing                                  #
#################################################################################

def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM centre crop: halve with BOX while large, BICUBIC to short side == size, crop the centre.

    A non-square image keeps the centre of its long side only (of a 40x300 spectrogram, 40 of the 300 px of
    time): it is cropped, not squeezed, so every image keeps the tokenizer's pixel aspect. Stage 1 notes it.
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top:top + size, left:left + size])


# The most pixels an image may have: 32 megapixels (e.g. 4096 x 8192, or 256 rows x 131072 columns of time).
# Decoding is checked against it before any pixel is read, so a decompression bomb (a few kB of PNG that would
# decode to 20000 x 20000) costs nothing; at the limit one decode needs ~0.3 GB (16-bit images: ~0.8 GB).
MAX_IMAGE_PIXELS = 4096 * 8192
# PIL warns above its own limit (89 Mpx) before refusing at twice that; ours is lower and says more.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class UnreadableImage(Exception):
    """An image file no stage can use (too large, truncated, not an image, an unsupported mode); the message
    says which file and why."""


def open_rgb(path: Path) -> Image.Image:
    """Any mode (grey, RGBA, palette, 16-bit) -> RGB. Raises UnreadableImage for a file over MAX_IMAGE_PIXELS
    (checked from its header, before decoding), a truncated or broken file, or one that is not an image.

    16-bit and float images are stretched per image, from their own minimum to their own maximum, onto
    0..255: absolute levels (one recording louder than another) are not kept. Alpha is composited on black.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UnreadableImage(f"{width}x{height} px ({width * height / 1e6:.0f} megapixels) is larger than "
                                      f"the {MAX_IMAGE_PIXELS / 1e6:.1f} megapixels an image may have; cut it into "
                                      "smaller images (e.g. square windows of time) or scale it down")
            image.load()
            return _to_rgb(image)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as err:
        raise UnreadableImage(f"larger than any image may be ({err})") from err
    except MemoryError as err:
        raise UnreadableImage("not enough memory to decode it") from err
    except Exception as err:   # PIL's decoders raise many types for malformed files (OSError, SyntaxError,
        # ValueError, struct.error, IndexError, EOFError...): whatever opening one file raises is about that file
        raise UnreadableImage(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__) from err


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        span = arr.max() - arr.min()
        arr = (arr - arr.min()) / (span if span > 0 else 1.0) * 255.0
        image = Image.fromarray(arr.astype(np.uint8))
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def read_image(path: Path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The one image reader of every stage: (3, size, size) float32 in [-1, 1], the tokenizer's input convention
    (ADM centre crop), and the file's (width, height) px. Raises UnreadableImage (see open_rgb)."""
    image = open_rgb(path)
    arr = np.asarray(center_crop(image, size), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).sub(0.5).div(0.5), image.size


@dataclass
class ImageRead:
    """One file of an ImageFiles: its image and size, or the reason it was passed over."""
    index: int                              # position in the list of files
    image: torch.Tensor | None              # (3, size, size) float32 in [-1, 1]; None when unreadable
    size_px: tuple[int, int] | None         # (width, height) of the file
    problem: str | None = None              # why it was passed over


class ImageFiles(Dataset):
    """A list of image files read with read_image: an unreadable file gives an ImageRead with `problem` set
    instead of stopping the run. Batch it with DataLoader(..., collate_fn=list)."""

    def __init__(self, paths: list[Path], image_size: int):
        self.paths, self.image_size = list(paths), image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> ImageRead:
        try:
            image, size_px = read_image(self.paths[index], self.image_size)
        except UnreadableImage as err:
            return ImageRead(index, None, None, str(err))
        return ImageRead(index, image, size_px)


def skip_message(path: Path | str, problem: str) -> str:
    """How every stage names an image it passes over."""
    return f"warning: skipping unreadable image {path}: {problem}"


def skipped_count(count: int) -> str:
    """The count at the end of a stage that passed over unreadable images."""
    return f"{count} unreadable image(s) skipped (named above)"


def crop_note(names: list[str], shapes: list[tuple[int, int]], image_size: int) -> str | None:
    """A note naming how many images (of `names`, (width, height) each) lose part of their long side to the
    centre crop, with the worst; None when every image is square."""
    cut = [(name, shape) for name, shape in zip(names, shapes) if shape[0] != shape[1]]
    if not cut:
        return None
    name, (w, h) = max(cut, key=lambda item: max(item[1]) / min(item[1]))
    return (f"note: {len(cut)} of {len(names)} images are not square; each is scaled to {image_size} px on its "
            f"short side and its long side (time, in a spectrogram) centre-cropped: {name} ({w}x{h}) keeps "
            f"{min(w, h)} of its {max(w, h)} px. Cut long recordings into square windows first to keep all of them.")


def load_bank(files: list[Path], size: int, workers: int = 8, log=print) -> torch.Tensor:
    """All readable images as one (N, 3, size, size) uint8 tensor: 192 KiB per 256x256 image keeps thousands in
    memory. Unreadable files are named (log) as they are met and counted at the end.

    Each image becomes uint8 in the thread that decodes it and goes straight into the bank: the float32 reads
    (4x the size: 3.7 GB for 31 users x 150 images at 256 px) are never all held at once."""
    reads = ImageFiles(files, size)

    def read_uint8(index: int) -> ImageRead:
        read = reads[index]
        return read if read.image is None else replace(read, image=to_uint8(read.image))

    bank, count = torch.empty(len(files), 3, size, size, dtype=torch.uint8), 0
    with ThreadPoolExecutor(workers) as pool:   # PIL decodes without the GIL
        for read in pool.map(read_uint8, range(len(reads))):    # in file order
            if read.image is None:
                log(skip_message(files[read.index], read.problem))
            else:
                bank[count], count = read.image, count + 1
    if count < len(files):
        log(skipped_count(len(files) - count))
    return bank[:count]
