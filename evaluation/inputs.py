"""Stage 4's inputs: the flags checked, the real train/val images and the generated samples, decoded once."""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.errors import PipelineError
from common.io import interrupted_replace
from data.images import User, scan_dataset
from data.samples import IMAGE_PATTERN
from evaluation.imageset import ImageSet, load_set


@dataclass
class Inputs:
    """The three image sets of an evaluation and the users they belong to."""
    users: list[User]
    train: ImageSet
    val: ImageSet
    gen: ImageSet
    notes: list[str]


def check_files(inception_weights: str | Path | None, vavae_path: str | Path | None) -> None:
    """The optional weight files exist; raises PipelineError naming the flag otherwise."""
    if inception_weights is not None and not Path(inception_weights).is_file():
        raise PipelineError(f"--inception_weights not found: {inception_weights}. Give a local torchvision "
                            "Inception-v3 state dict, or leave the flag out to skip Inception FID/KID.")
    if vavae_path is not None and not Path(vavae_path).is_file():
        raise PipelineError(f"--vavae_path not found: {vavae_path}. Give the tokenizer stage 1 used, or leave the "
                            "flag out to skip the tokenizer ceiling.")


def scan_generated(generated_dir: str | Path, users: list[User]) -> list[tuple[Path, int]]:
    """(file, user number) of every micro_doppler_userNN_KKK.png, sorted by user then sample number.

    Raises PipelineError when the folder is missing, holds no such file, names a user not in `users`, or a stage 3
    run stopped while moving its samples in (common.io.interrupted_replace).
    """
    root = Path(generated_dir)
    if not root.is_dir():
        raise PipelineError(f"--generated_dir not found: {root}. Point it at the folder stage 3 wrote "
                            "its micro_doppler_userNN_KKK.png files into.")
    if interrupted_replace(root):
        raise PipelineError(f"a stage 3 run stopped while moving its samples into {root}, so they may mix two runs. "
                            f"Rerun stage 3 (stage3_inference.py --output_dir {root}).")
    found, others = [], []
    for path in root.iterdir():
        match = IMAGE_PATTERN.fullmatch(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), int(match.group(2)), path))
        elif path.is_file():
            others.append(path.name)
    if not found:
        seen = f" It holds {len(others)} other file(s), e.g. {', '.join(sorted(others)[:3])}." if others else " It is empty."
        raise PipelineError(f"no generated images named micro_doppler_userNN_KKK.png in {root}.{seen} "
                            "Run stage 3 (generation) first or point --generated_dir at its output.")
    valid = {u.number for u in users}
    unknown = sorted({n for n, _, _ in found if n not in valid})
    if unknown:
        raise PipelineError(f"{root} has generated images for user number(s) {', '.join(map(str, unknown))}, "
                            f"which are not in the data folder. Valid user numbers: "
                            f"{', '.join(str(n) for n in sorted(valid))}. Use the --data_dir the model was trained on.")
    found.sort()
    return [(path, number) for number, _, path in found]


def load_inputs(data_dir: Path, generated_dir: str | Path, image_size: int, classifier_size: int, batch_size: int,
                num_workers: int, log: Callable[[str], None]) -> Inputs:
    """Real train/val images of every user and the generated samples, decoded once (uint8, classifier size).

    Raises PipelineError when no generated image can be read (and, via scan_generated, for a bad folder).
    """
    users = scan_dataset(data_dir, log=log)
    generated = scan_generated(generated_dir, users)
    index_of = {u.number: c for c, u in enumerate(users)}

    def split(name: str) -> tuple[list[Path], list[int]]:
        pairs = [(p, c) for c, u in enumerate(users) for p in u.files.get(name, [])]
        return [p for p, _ in pairs], [c for _, c in pairs]

    log(f"loading {sum(len(u.files['train']) for u in users)} train, {sum(len(u.files['val']) for u in users)} val "
        f"and {len(generated)} generated images ({len(users)} users)")
    train = load_set(*split("train"), image_size, classifier_size, batch_size, num_workers, log)
    val = load_set(*split("val"), image_size, classifier_size, batch_size, num_workers, log)
    gen = load_set([p for p, _ in generated], [index_of[n] for _, n in generated], image_size,
                   classifier_size, batch_size, num_workers, log)
    if len(gen) == 0:
        raise PipelineError(f"none of the {len(generated)} generated images in {generated_dir} could be read.")
    notes = []
    if len(val) == 0:
        notes.append("The data folder has no readable val images: the identity ceiling, the real-val baselines, "
                     "TSTR and the augmentation gain are unavailable, and the copy threshold is calibrated on train "
                     "leave-one-out.")
    return Inputs(users, train, val, gen, notes)
