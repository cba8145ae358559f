"""The seed's scale on one machine: 31 users end to end at tiny size, and image banks that never hold every
image as float32 at once."""
import json
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.io import load_safetensors
from common.pixels import to_uint8
from data import images as image_files
from helpers import IMAGE_SIZE, TINY_DIT_MODEL_FLAGS, make_dataset, make_tokenizer, run_stage, track_image
from models.checkpoint import checkpoint_info, load_checkpoint
from models.sampling import grid_image

NUM_USERS = 31      # the seed's dataset: 31 people
USERS = [f"ID_{n}" for n in range(1, NUM_USERS + 1)]    # in number order: ID_2 before ID_10


def test_an_image_bank_holds_no_more_float_images_than_decoding_threads(tmp_path, monkeypatch):
    """load_bank (stage 1's REPA images and tokenizer check, the tokenizer trainer, stage 4's ceiling) keeps uint8
    images only: a float32 read (4x the size; 3.7 GB for 31 x 150 images at 256 px) lives only while its thread
    converts it. The bank is the files' uint8 pixels in file order, an unreadable file left out."""
    data = make_dataset(tmp_path / "data", users=("ID_1",), per_user=12, draw=track_image)
    files = sorted((data / "ID_1").iterdir())
    (data / "ID_1" / "img_005.png").write_bytes(b"not an image")
    live, peak, lock = [0], [0], threading.Lock()
    read = image_files.read_image

    def counted_read(path, size):
        image, size_px = read(path, size)
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        weakref.finalize(image, lambda: live.__setitem__(0, live[0] - 1))
        return image, size_px

    monkeypatch.setattr(image_files, "read_image", counted_read)
    logged = []
    bank = image_files.load_bank(files, 32, workers=2, log=logged.append)
    assert peak[0] <= 2, f"{peak[0]} float32 images held at once by 2 decoding threads"
    good = [f for f in files if f.name != "img_005.png"]
    assert torch.equal(bank, torch.stack([to_uint8(read(f, 32)[0]) for f in good]))
    assert bank.dtype == torch.uint8 and any("img_005.png" in line for line in logged)


@pytest.mark.slow
def test_31_users_end_to_end(tmp_path):
    """run_complete_pipeline.py on 31 user folders of 2 train + 1 val images, every stage at its cheapest: each
    user keeps its own class, in folder-number order, through the latents, the checkpoint, the samples, the grid
    and stage 4's report."""
    data = make_dataset(tmp_path / "data", users=USERS[::-1], per_user=2, val_per_user=1, draw=track_image)
    out = tmp_path / "run"
    run = run_stage("run_complete_pipeline.py", "--data_dir", data, "--vavae_path",
                    make_tokenizer(tmp_path / "tok.safetensors"), "--output_dir", out, "--image_size", IMAGE_SIZE,
                    "--batch_size", 8, "--max_epochs", 1, *TINY_DIT_MODEL_FLAGS, "--precision", "32-true",
                    "--accelerator", "cpu", "--classifier_steps", 4, "--val_identity_samples", 1,
                    "--num_samples_per_user", 1, "--num_steps", 2,
                    "--classifier_max_steps", 2, "--gain_seeds", 1, "--low_data_per_user", 0,
                    "--classifier_size", 16, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    for split, per_user in (("train", 2), ("val", 1)):
        tensors, meta = load_safetensors(out / "latent_features" / f"{split}.safetensors")
        assert meta["users"] == USERS and meta["user_numbers"] == list(range(1, NUM_USERS + 1))
        labels = tensors["user_ids"]
        assert torch.equal(torch.bincount(labels, minlength=NUM_USERS), torch.full((NUM_USERS,), per_user))
        # each latent's class is the folder its image came from
        assert [Path(name).parent.name for name in meta["files"]] == [USERS[c] for c in labels.tolist()]

    info = checkpoint_info(load_checkpoint(out / "trained_models" / "checkpoints" / "best.ckpt"))
    assert info.users == USERS and info.user_numbers == list(range(1, NUM_USERS + 1))
    assert info.model_config["num_classes"] == NUM_USERS

    generated = out / "generated_images"
    assert sorted(p.name for p in generated.glob("micro_doppler_user*.png")) == sorted(
        f"micro_doppler_user{n:02d}_001.png" for n in range(1, NUM_USERS + 1))
    tile = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    one_row = grid_image({(1, 0): tile}, [1], 1)
    assert Image.open(generated / "micro_doppler_grid.png").size == (one_row.width, NUM_USERS * one_row.height)

    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert [u["name"] for u in report["dataset"]["users"]] == USERS
    assert all(u["n_train"] == 2 and u["n_val"] == 1 and u["n_generated"] == 1 for u in report["dataset"]["users"])
    assert sorted(map(int, report["identity"]["per_user"])) == list(range(1, NUM_USERS + 1))
