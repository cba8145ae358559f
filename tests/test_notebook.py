"""examples/kaggle_2xT4.ipynb as a Kaggle user runs it, top to bottom, at tiny size on the CPU (nbclient, a kernel of
this Python); the README's Kaggle section shows the notebook's own lines."""
import base64
import re
import zipfile

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import ROOT, make_dataset, make_tokenizer

NOTEBOOK = ROOT / "examples" / "kaggle_2xT4.ipynb"
# The smallest settings that still train the noisy-latent classifier behind val_identity and export a dataset.
TINY_FLAGS = "--max_epochs 1 --classifier_steps 20 --num_workers 0"


def outputs_of(cell) -> tuple[str, list[dict]]:
    """A run cell's printed text, and its rich outputs (display data)."""
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    return text, [o["data"] for o in cell.outputs if o.output_type in ("display_data", "execute_result")]


def cell_after(nb, heading: str):
    """The code cell under the markdown heading that starts with `heading`."""
    index = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith(heading))
    return nb.cells[index + 1]


@pytest.mark.slow
def test_the_kaggle_notebook_runs_top_to_bottom(tmp_path):
    data = make_dataset(tmp_path / "input" / "people", per_user=4, val_per_user=2)
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
    assert "3 people in" in text and "ID_10: 4 train, 2 val images" in text, text
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
    for user in ("ID_1", "ID_2", "ID_10"):
        assert sum(n.startswith(f"train/{user}/") and not n.endswith("/") for n in names) >= 4   # 4 real + accepted
        assert sum(n.startswith(f"val/{user}/") and not n.endswith("/") for n in names) == 2


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
