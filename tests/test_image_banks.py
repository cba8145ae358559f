"""Image banks (data/images.load_bank: stage 1's REPA images and tokenizer check, the tokenizer trainer, stage 4's
ceiling) never hold every image as float32 at once: at the seed's scale (31 x 150 images at 256 px) that was 3.7 GB.
The seed's 31 people run end to end in tests/test_notebook.py, through the Kaggle notebook."""
import threading
import weakref

import torch

from common.pixels import to_uint8
from data import images as image_files
from helpers import make_dataset, track_image


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
