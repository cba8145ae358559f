"""Stage 1's outputs and what stage 2 accepts of them: val is never empty, latents are finite, user ids
name real users, and a folder never mixes two runs (issue 18: 1, 4, 5, 6)."""
import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data.latents as latents_mod
from common.device import bf16_supported
from common.errors import PipelineError
from common.io import REPLACING_MARKER, load_safetensors, save_safetensors
from data.images import scan_dataset
from data.latent_files import STAGE1_FILES, load_latents, load_stats
from data.cli import ExtractOptions
from data.latents import extract_features
from helpers import IMAGE_SIZE, make_dataset, make_module, make_tokenizer, track_image

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tok.safetensors")


def stage1(data: Path, tokenizer: Path, out: Path, log=lambda m: None, **flags) -> dict:
    return extract_features(ExtractOptions.defaults(data_dir=str(data), vavae_path=str(tokenizer), output_path=str(out),
                                                    batch_size=4, image_size=IMAGE_SIZE, num_workers=0,
                                                    **{"tokenizer_check_images": 0, **flags}), log=log)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in STAGE1_FILES}


#################################################################################
#                       18.1: a val split that is empty                         #
#################################################################################

@pytest.mark.parametrize("layout", ["empty_val_folder", "users_of_two_images"])
def test_no_val_image_holds_out_train_images_that_every_stage_sees(tmp_path, tokenizer, layout):
    """Stage 1 wrote (0,)-shaped val latents and stage 2 crashed after an epoch; now some train images are
    held out, the same ones stage 4 (scan_dataset) takes as val."""
    if layout == "empty_val_folder":
        data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2", "ID_3"), per_user=5, val_per_user=0,
                            draw=track_image)
    else:
        data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2", "ID_3"), per_user=2, draw=track_image)
    logged = []
    summary = stage1(data, tokenizer, tmp_path / "out", logged.append)
    per_user = 5 if layout == "empty_val_folder" else 2
    assert summary["val"] == 3 and summary["train"] == 3 * (per_user - 1)   # round(20%), at least one, per user
    assert any("holding out 3 train image(s) as val" in m for m in logged)
    val, _ = load_safetensors(tmp_path / "out" / "val.safetensors")
    assert val["latents"].shape == (3, 32, 4, 4) and val["user_ids"].tolist() == [0, 1, 2]
    split = json.loads((tmp_path / "out" / "split.json").read_text())["users"]
    stage4 = {u.name: [str(f.relative_to(data.resolve())) for f in u.files["val"]]
              for u in scan_dataset(data.resolve(), log=lambda m: None)}
    assert {name: files["val"] for name, files in split.items()} == stage4
    assert all(not set(files["train"]) & set(files["val"]) for files in split.values())
    module = make_module(tmp_path / "out")             # stage 2 gets latents to validate on
    assert len(module.val_x) == 3


def test_every_user_with_one_image_is_refused_with_what_to_do(tmp_path, tokenizer):
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=1, draw=track_image)
    with pytest.raises(PipelineError, match=r"every user has a single image.*Add a second image"):
        stage1(data, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_stage2_refuses_an_empty_latent_file_by_name(tmp_path, latent_dir):
    shutil.copytree(latent_dir, tmp_path / "lat")
    tensors, meta = load_safetensors(tmp_path / "lat" / "val.safetensors")
    save_safetensors({"latents": torch.empty(0), "user_ids": torch.empty(0, dtype=torch.int64)},
                     tmp_path / "lat" / "val.safetensors", meta)
    with pytest.raises(PipelineError, match=r"val\.safetensors holds latents of shape \(0,\).*rerun it"):
        make_module(tmp_path / "lat")


#################################################################################
#                       18.4: latents that are not finite                       #
#################################################################################

@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer) -> Path:
    """One finished stage 1 run on 3 users (4 train, 1 val each)."""
    root = tmp_path_factory.mktemp("run")
    data = make_dataset(root / "data", users=("ID_1", "ID_2", "ID_3"), per_user=4, val_per_user=1,
                        draw=track_image)
    stage1(data, tokenizer, root / "out")
    return root


def test_stage1_refuses_nonfinite_latents_naming_the_images(tmp_path, tokenizer, run, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(run / "out", out)
    before = snapshot(out)
    real = latents_mod.encode_all

    def one_inf(*args, **kwargs):
        encoded = real(*args, **kwargs)
        encoded.latents[2, 5, 1, 1] = float("inf")
        return encoded

    monkeypatch.setattr(latents_mod, "encode_all", one_inf)
    with pytest.raises(PipelineError, match=r"latents of train images .*: 1 of 12 hold inf/NaN values "
                                            r"\(train/ID_1/img_002\.png\).*nothing was written"):
        stage1(run / "data", tokenizer, out)
    assert snapshot(out) == before


def test_stage2_names_the_file_and_image_of_nonfinite_latents(tmp_path, run):
    out = tmp_path / "out"
    shutil.copytree(run / "out", out)
    tensors, meta = load_safetensors(out / "train.safetensors")
    tensors["latents"][5, 0, 0, 0] = float("nan")
    save_safetensors(tensors, out / "train.safetensors", meta)
    with pytest.raises(PipelineError) as err:
        make_module(out)
    message = str(err.value)
    assert "train.safetensors holds latents that are not finite: 1 of 12" in message
    assert meta["files"][5] in message and meta["files"][5] == "train/ID_2/img_001.png"
    assert "rerun stage 1" in message and "Try a lower --lr" not in message


#################################################################################
#                    18.5: user ids without a user table                        #
#################################################################################

def _foreign_latents(folder: Path, train_ids: list[int], val_ids: list[int], meta: dict | None = None) -> Path:
    g = torch.Generator().manual_seed(0)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        save_safetensors({"latents": torch.randn(len(ids), 32, 4, 4, generator=g), "user_ids": torch.tensor(ids)},
                         folder / f"{split}.safetensors", meta)
    save_safetensors({"mean": torch.zeros(1, 32, 1, 1), "std": torch.ones(1, 32, 1, 1)},
                     folder / "latent_stats.safetensors", meta)
    return folder


def test_ids_without_metadata_are_the_users_and_every_class_is_trained(tmp_path):
    """Ids 1..3 from another tool gave 4 classes (class 0 never trained) named ID_1..ID_4, off by one."""
    from models.sampling import class_indices
    folder = _foreign_latents(tmp_path, [1, 2, 3, 1, 2, 3, 3], [1, 2, 3])
    module = make_module(folder)
    assert module.model.num_classes == 3
    assert module.info.users == ["ID_1", "ID_2", "ID_3"] and module.info.user_numbers == [1, 2, 3]
    assert module.train_y.tolist() == [0, 1, 2, 0, 1, 2, 2] and module.val_y.tolist() == [0, 1, 2]
    # stage 3 --user_ids 1 samples the class the file's user 1 trained
    assert class_indices([1], module.info.user_numbers, module.info.users) == [0]


@pytest.mark.parametrize("train_ids, val_ids, meta, pattern", [
    ([0, 1, 2, 3], [0, 1], {"users": ["ID_1", "ID_2", "ID_3"]},
     r"train\.safetensors has user id\(s\) \[3\] but its metadata names 3 users"),
    ([0, 1, 0, 1], [0, 1], {"users": ["ID_1", "ID_2", "ID_3"]}, r"no latents of user\(s\) ID_3"),
    ([1, 2, 1, 2], [1, 5], None, r"val\.safetensors has user id\(s\) \[5\] that train\.safetensors has no latents of"),
], ids=["id_outside_users", "user_without_latents", "val_user_not_in_train"])
def test_user_ids_the_users_do_not_cover_are_refused_before_training(tmp_path, train_ids, val_ids, meta, pattern):
    """An id outside the metadata's users crashed with IndexError after two steps."""
    with pytest.raises(PipelineError, match=pattern):
        make_module(_foreign_latents(tmp_path, train_ids, val_ids, meta))


#################################################################################
#               18.6: outputs replaced together, one run per folder             #
#################################################################################

def test_failed_rerun_keeps_the_previous_run_whole(tmp_path, tokenizer, run):
    """A new user whose only val image is broken: train.safetensors and split.json were already replaced."""
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(run / "data", data)
    shutil.copytree(run / "out", out)
    before = snapshot(out)
    make_dataset(data, users=("ID_4",), per_user=2, val_per_user=0, draw=track_image)
    (data / "val" / "ID_4" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(PipelineError, match=r"ID_4 have no readable images in val/"):
        stage1(data, tokenizer, out)
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(STAGE1_FILES)    # no staging folder left
    make_module(out)


def test_a_folder_mixing_two_runs_is_refused(tmp_path, tokenizer, run):
    out, other = tmp_path / "out", tmp_path / "other"
    shutil.copytree(run / "out", out)
    stage1(run / "data", tokenizer, other)                 # same images, another run
    shutil.copy(other / "val.safetensors", out / "val.safetensors")
    with pytest.raises(PipelineError, match=r"mixes the files of different stage 1 runs.*val\.safetensors: "
                                            r"[0-9a-f]{8}.*Rerun stage 1"):
        make_module(out)
    with pytest.raises(PipelineError, match=r"mixes"):
        load_stats(out)


def test_an_interrupted_swap_is_detected(tmp_path, run, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(run / "out", out)
    (out / REPLACING_MARKER).write_text(json.dumps(list(STAGE1_FILES)))
    with pytest.raises(PipelineError, match=r"stopped while replacing its files"):
        load_latents(out, "train")


#################################################################################
#                         Smaller notes: non-square images                      #
#################################################################################

def test_non_square_images_are_centre_cropped_with_a_note(tmp_path, tokenizer):
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=3, val_per_user=1, draw=track_image)
    Image.fromarray(np.zeros((40, 300, 3), np.uint8)).save(data / "train" / "ID_1" / "long.png")
    logged = []
    stage1(data, tokenizer, tmp_path / "out", logged.append)
    note = next(m for m in logged if "not square" in m)
    assert "1 of 9 images" in note and "long.png" in note and "keeps 40 of its 300 px" in note


#################################################################################
#                          The encoder's precision                              #
#################################################################################

@pytest.mark.skipif(not bf16_supported("cpu"), reason="without native bf16 every precision encodes in fp32")
def test_mixed_precision_encodes_in_bf16_near_fp32_and_records_it(tmp_path, tokenizer):
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=4, val_per_user=1, draw=track_image)
    runs = {}
    for precision in ("32-true", "bf16-mixed", "16-mixed"):
        summary = stage1(data, tokenizer, tmp_path / precision, precision=precision, tokenizer_check_images=4)
        latents, _, meta = load_latents(tmp_path / precision, "train", log=lambda m: None)
        runs[precision] = latents, meta, summary["tokenizer_psnr_db"]
    fp32, bf16 = runs["32-true"][0], runs["bf16-mixed"][0]
    assert [runs[p][1]["encoder_autocast"] for p in runs] == ["none", "bf16", "bf16"]
    assert torch.equal(runs["16-mixed"][0], bf16)     # 16-mixed is bf16 where bf16 is native, never fp16
    # bf16 keeps 8 significant bits (a 2^-9 relative rounding per operation): near, and not the same numbers
    relative = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert 0 < relative < 0.05, relative
    assert abs(runs["bf16-mixed"][2] - runs["32-true"][2]) < 1.0     # the check reconstructs in the same precision


def test_mixed_precision_is_fp32_where_bf16_is_not_native(monkeypatch):
    import common.device as device_mod
    monkeypatch.setattr(device_mod, "bf16_supported", lambda device: False)
    for precision in ("32-true", "16-mixed", "bf16-mixed"):
        assert device_mod.inference_autocast(precision, "cpu") is nullcontext
    monkeypatch.setattr(device_mod, "bf16_supported", lambda device: True)
    assert device_mod.inference_autocast("32-true", "cpu") is nullcontext
    with device_mod.inference_autocast("16-mixed", "cpu")():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
