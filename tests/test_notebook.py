"""examples/kaggle_2xT4.ipynb as a Kaggle user runs it, top to bottom, at tiny size on the CPU (nbclient, a kernel of
this Python), on the seed's 31 people: each keeps its own class, in folder-number order, through the latents, the
checkpoint, the samples, the grid, stage 4's report and the exported dataset. The README's Kaggle section shows the
notebook's own lines."""
import base64
import json
import re
import zipfile
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient
from PIL import Image

from common.io import load_safetensors
from helpers import IMAGE_SIZE, ROOT, make_dataset, make_tokenizer, track_image
from models.checkpoint import checkpoint_info, load_checkpoint
from models.sampling import grid_image

NOTEBOOK = ROOT / "examples" / "kaggle_2xT4.ipynb"
NUM_USERS = 31      # the seed's dataset: 31 people
USERS = [f"ID_{n}" for n in range(1, NUM_USERS + 1)]    # in number order: ID_2 before ID_10
# The smallest settings that still train the noisy-latent classifier behind val_identity and export a dataset.
TINY_FLAGS = ("--max_epochs 1 --batch_size 8 --classifier_steps 20 --val_identity_samples 1 --num_workers 0 "
              "--num_samples_per_user 1 --num_steps 2")


def outputs_of(cell) -> tuple[str, list[dict]]:
    """A run cell's printed text, and its rich outputs (display data)."""
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    return text, [o["data"] for o in cell.outputs if o.output_type in ("display_data", "execute_result")]


def cell_after(nb, heading: str):
    """The code cell under the markdown heading that starts with `heading`."""
    index = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith(heading))
    return nb.cells[index + 1]


def check_every_user_keeps_its_class(out: Path) -> None:
    """Latents, checkpoint, samples, grid and report of a run on USERS (2 train + 1 val images each) under `out`."""
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
    one_row = grid_image({(1, 0): np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)}, [1], 1)
    assert Image.open(generated / "micro_doppler_grid.png").size == (one_row.width, NUM_USERS * one_row.height)
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert [u["name"] for u in report["dataset"]["users"]] == USERS
    assert all(u["n_train"] == 2 and u["n_val"] == 1 and u["n_generated"] == 1 for u in report["dataset"]["users"])
    assert sorted(map(int, report["identity"]["per_user"])) == list(range(1, NUM_USERS + 1))


@pytest.mark.slow
def test_the_kaggle_notebook_runs_the_seeds_31_people_top_to_bottom(tmp_path):
    # Folders made in reverse order: the class order must come from the numbers, not from the file system.
    data = make_dataset(tmp_path / "input" / "people", users=USERS[::-1], per_user=2, val_per_user=1,
                        draw=track_image)
    tokenizer = make_tokenizer(tmp_path / "input" / "tok.safetensors")
    out = tmp_path / "working" / "outputs"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    parameters = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(parameters + 1, nbformat.v4.new_code_cell(   # as papermill injects parameters
        f"REPO, DATA_DIR, VAVAE_PATH = Path({str(ROOT)!r}), Path({str(data)!r}), Path({str(tokenizer)!r})\n"
        f"OUTPUT_DIR, CONFIG, FLAGS = {str(out)!r}, 'configs/tiny_cpu.yaml', {TINY_FLAGS!r}\n"
        "INSTALL = False   # no network in tests: the install cell is the only one left out"))
    NotebookClient(nb, kernel_name="python3", timeout=600,   # raises CellExecutionError, naming the cell, if one fails
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    text, _ = outputs_of(cell_after(nb, "## The GPUs"))
    assert re.search(r"0 GPU\(s\)", text) and f"free for {out}" in text, text
    text, _ = outputs_of(cell_after(nb, "## The dataset"))
    assert f"{NUM_USERS} people in" in text and "ID_10: 2 train, 1 val images" in text, text
    text, _ = outputs_of(cell_after(nb, "## The seed's command"))
    assert "== stage 4:" in text and "--export_dir" in text, text[-3000:]
    _, shown = outputs_of(cell_after(nb, "## Training"))
    assert [base64.b64decode(d["image/png"]) for d in shown[:1]] == [(out / "trained_models" / "loss_curve.png")
                                                                     .read_bytes()]
    assert len(shown) == 2 and "image/png" in shown[1]                     # and the val_identity plot
    _, shown = outputs_of(cell_after(nb, "## The samples"))
    assert base64.b64decode(shown[0]["image/png"]) == (out / "generated_images" / "micro_doppler_grid.png").read_bytes()
    _, shown = outputs_of(cell_after(nb, "## Stage 4"))
    assert re.search(r"\| identity: generated top-1 \| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \|", shown[0]["text/markdown"])
    with zipfile.ZipFile(out / "dataset.zip") as archive:
        names = archive.namelist()
    for user in USERS:
        assert sum(n.startswith(f"train/{user}/") and not n.endswith("/") for n in names) >= 2   # 2 real + accepted
        assert sum(n.startswith(f"val/{user}/") and not n.endswith("/") for n in names) == 1
    check_every_user_keeps_its_class(out)


def test_the_readme_kaggle_section_is_the_notebooks_cells():
    """Every line of the README's Kaggle code block is a line of the notebook's code, and the section links it."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## On Kaggle"):]
    section = section[:section.index("\n## ", 1)]
    assert "examples/kaggle_2xT4.ipynb" in section
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the Kaggle section shows no python block"
    notebook_lines = {line.rstrip() for cell in nbformat.read(NOTEBOOK, as_version=4).cells
                      if cell.cell_type == "code" for line in cell.source.splitlines()}
    for line in "".join(blocks).splitlines():
        assert not line.strip() or line.rstrip() in notebook_lines, f"README line not in the notebook: {line!r}"
