"""report.json, report.md and the PNG plots of an evaluation; every file written atomically."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.io import atomic_path, write_text  # noqa: E402
from data.images import User  # noqa: E402
from evaluation.imageset import ImageSet  # noqa: E402

SAMPLES_PER_ROW = 4     # real and generated images shown per user in samples.png
MAX_SAMPLE_USERS = 32


#################################################################################
#                                    Plots                                      #
#################################################################################

def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def _show(ax: plt.Axes, image: torch.Tensor, title: str | None = None) -> None:
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def plot_confusion(report: dict, path: Path) -> None:
    labels = report["identity"]["confusion_labels"]
    n = len(labels)
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(4, 0.3 * n + 2), max(4, 0.3 * n + 1.5)))
    for ax, key, title in ((axes[0], "confusion_real_val", "real val"), (axes[1], "confusion_generated", "generated")):
        counts = np.asarray(report["identity"][key], dtype=float)
        # Row-normalised so that users with more samples do not dominate the colour scale.
        rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(rows, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n), labels, fontsize=6, rotation=90)
        ax.set_yticks(range(n), labels, fontsize=6)
        ax.set_xlabel("predicted user")
        ax.set_ylabel("true / intended user")
        ax.set_title(f"{title} (row-normalised)")
    _save(fig, path)


def plot_per_user_accuracy(report: dict, path: Path) -> None:
    per_user = report["identity"]["per_user"]
    numbers = list(per_user)
    real = [per_user[n]["real_val_top1"] or 0.0 for n in numbers]
    gen = [per_user[n]["generated_top1"] or 0.0 for n in numbers]
    x = np.arange(len(numbers))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(numbers) + 2), 3.5))
    ax.bar(x - 0.2, real, 0.4, label="real val (ceiling)")
    ax.bar(x + 0.2, gen, 0.4, label="generated")
    ax.axhline(report["dataset"]["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, numbers, fontsize=7)
    ax.set_xlabel("user")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_samples(users: list[User], train: ImageSet, gen: ImageSet, path: Path) -> None:
    """One row per user: a few real training images, then a few generated ones."""
    shown = users[:MAX_SAMPLE_USERS]
    cols = 2 * SAMPLES_PER_ROW
    fig, axes = plt.subplots(len(shown), cols, figsize=(cols * 1.1, len(shown) * 1.2), squeeze=False)
    for r, user in enumerate(shown):
        c_index = users.index(user)
        real = train.images[train.labels == c_index][:SAMPLES_PER_ROW]
        fake = gen.images[gen.labels == c_index][:SAMPLES_PER_ROW]
        for j in range(cols):
            ax = axes[r, j]
            pool, k = (real, j) if j < SAMPLES_PER_ROW else (fake, j - SAMPLES_PER_ROW)
            if k < len(pool):
                _show(ax, pool[k], ("real" if j < SAMPLES_PER_ROW else "generated") if r == 0 else None)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(user.name, fontsize=7)
    _save(fig, path)


def plot_nearest(closest: list[dict], pairs: list[tuple[int, int]], train: ImageSet, gen: ImageSet,
                 path: Path) -> None:
    """The generated samples closest to a training image (`pairs`: their indices), next to that image."""
    if not closest:
        return
    fig, axes = plt.subplots(2, len(closest), figsize=(1.6 * len(closest), 3.6), squeeze=False)
    for j, (pair, (gen_index, train_index)) in enumerate(zip(closest, pairs)):
        flag = "COPY " if pair["copy"] else ""
        _show(axes[0, j], gen.images[gen_index], f"{flag}gen\npix {pair['pixel_distance']:.2f}")
        _show(axes[1, j], train.images[train_index], "nearest train")
    _save(fig, path)


#################################################################################
#                                   Markdown                                    #
#################################################################################

def _f(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(value: float | None, interval: list[float] | None, digits: int = 3, sign: str = "") -> str:
    """A value with its 95 % interval: `0.283 [0.210, 0.370]` (sign "+": `+0.010 [-0.037, +0.060]`, for
    differences); the value alone when there is no interval."""
    if value is None or interval is None:
        return _f(value, digits) if value is None or not sign else f"{value:{sign}.{digits}f}"
    return f"{value:{sign}.{digits}f} [{interval[0]:{sign}.{digits}f}, {interval[1]:{sign}.{digits}f}]"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _intro(report: dict) -> list[str]:
    ds = report["dataset"]
    return ["# Generation evaluation", "",
            f"{ds['num_users']} users; chance level (1/num_users) = {ds['chance']:.3f}. "
            f"Reference set for distribution metrics: real **train** images. The *real val* column scores held-out "
            f"real images the same way: it is what a perfect generator would get, so read generated numbers against "
            f"it rather than against 0 or 1 (the classifier has seen the train images, so their features are tighter "
            f"than those of any unseen image).", ""]


def _tokenizer_lines(recon: dict | None, ceiling_ci: list[float] | None) -> list[str]:
    if not recon or recon.get("top1") is None:
        return []
    # The advice only where the reconstructions are below the real-val ceiling beyond the noise of both.
    below = ceiling_ci is not None and recon.get("top1_ci") is not None and recon["top1_ci"][1] < ceiling_ci[0]
    return ["", f"The tokenizer's own reconstructions of the real val images ({recon['psnr_db']:.1f} dB PSNR) score "
                f"top-1 **{_ci(recon['top1'], recon.get('top1_ci'))}**: generated images are decoded by the same tokenizer, so this, not the "
                "real-val column, is the most they can reach."
                + (" It is below the ceiling beyond both intervals: the tokenizer loses what tells people apart; "
                   "fine-tune it (train_tokenizer.py --init_from)." if below else "")]


def _identity_section(report: dict) -> list[str]:
    ident = report["identity"]
    rows = [["top-1 [95 % interval]", _ci(ident["real_val_top1"], ident.get("real_val_top1_ci")),
             _ci(ident["generated_top1"], ident.get("generated_top1_ci"))]]
    # Top-5 of fewer than 10 users says little (of 6 users it is near 1.000 for any image): shown from 10 users.
    if 5 < report["dataset"]["num_users"] / 2:
        rows.append(["top-5", ident["real_val_top5"], ident["generated_top5"]])
    rows.append(["mean confidence", ident["real_val_mean_confidence"], ident["generated_mean_confidence"]])
    judge = report["classifier"]
    over_seeds = judge.get("real_val_top1_over_seeds")
    seeds_line = ([f"Over {len(over_seeds['seeds'])} classifier seeds of the same recipe, real-val top-1 "
                   f"{_ci(over_seeds['top1'], over_seeds['top1_ci'])} (mean; interval over seeds and val images)."]
                  if over_seeds else [])
    return ["## Identity (user classifier trained on real train images)", "",
            "Top-1 = share of images the classifier assigns to their (intended) user; real val top-1 is the ceiling "
            "a perfect generator could reach. Brackets: 95 % interval (Wilson) over the images scored; two runs "
            "whose intervals overlap do not differ beyond their noise (python -m evaluation.compare).", "",
            f"The classifier ({judge['arch']} at {judge['resolution']} px) trained until its top-1 on "
            f"{judge['held_out_fraction']:.0%} of the train images held out stopped rising: best at step "
            f"{judge.get('best_step')} of {judge.get('steps')} (at most {judge['max_steps']}), held-out top-1 "
            f"{_f(judge.get('held_out_top1'))}.", *seeds_line, "",
            _table(["", "real val (ceiling)", "generated"], rows),
            *_tokenizer_lines(ident.get("tokenizer_reconstructions"), ident.get("real_val_top1_ci")),
            "", f"Generated top-1 relative to the ceiling: "
            f"{_ci(ident['relative_to_ceiling'], ident.get('relative_to_ceiling_ci'))} (bootstrap over both image sets). "
            f"Classifier: {report['classifier'].get('path')} ({'reused from cache' if report['classifier'].get('cached') else 'trained this run'}).", ""]


def _distribution_section(report: dict) -> list[str]:
    fd, kid, man = report["fd"], report["kid"], report["manifold"]
    return ["## Fidelity and diversity (classifier feature space)", "",
            "- **FD**: Frechet distance between Gaussians fitted to the features; lower is closer to real.",
            "- **KID**: kernel (MMD) distance, unbiased in the sample size; lower is better, ~0 for the same distribution.",
            f"- **Precision / recall** (k={man['k']}): share of generated images inside the real manifold (fidelity) / "
            "share of real images inside the generated manifold (variety reached).",
            "- **Density / coverage**: like precision/recall but robust to outliers; density ~1 and coverage ~1 for a "
            "sample from the real distribution.",
            "- **Inception Score** (with the user classifier): high when each image is confidently one user and all "
            f"users occur; maximum {report['inception_score']['max']}.", "",
            _table(["metric", "real val", "generated"],
                   [["FD (classifier)", fd["classifier_real_val"], fd["classifier"]],
                    ["KID (classifier)", kid["classifier_real_val"], kid["classifier"]],
                    ["FD (Inception-v3)", fd["inception_real_val"], fd["inception"]],
                    ["KID (Inception-v3)", kid["inception_real_val"], kid["inception"]],
                    *[[k, man["real_val"][k], man["generated"][k]] for k in ("precision", "recall", "density", "coverage")],
                    ["Inception Score (classifier)", report["inception_score"]["real_val"],
                     report["inception_score"]["generated"]],
                    ["diversity ratio (mean over users)", report["diversity"]["real_val_mean_ratio"],
                     report["diversity"]["mean_ratio"]]]),
            "", f"Inception-v3: {report['inception']['message']}",
            "", "Diversity ratio = mean pairwise feature distance within a user, divided by that of the user's real "
            "train images; well below the real-val ratio means the generator collapses to few modes.", ""]


def _memorization_section(report: dict) -> list[str]:
    memo = report["memorization"]
    return ["## Memorisation", "",
            f"For each generated image its nearest training image, in pixel space (32x32) and in classifier features. "
            f"Rule: {memo['rule']} ({memo['reference']}).", "",
            _table(["view", "threshold", "copy rate", "median NN distance generated", "median NN distance real val"],
                   [[v, memo[v]["threshold"], memo[v]["copy_rate"], memo[v]["generated_median_nn"],
                     memo[v]["real_median_nn"]] for v in ("pixel", "feature")]),
            "", f"**Copy rate (either view): {_f(memo['copy_rate'])}** ({memo['num_copies']} images). "
            "Closest pairs: nearest_neighbours.png.", ""]


ARM_LABELS = {"real": "real", "classical": "real + classical", "generated": "real + classical + generated"}


def _gain_cell(gain: dict) -> str:
    ties = f", {gain['ties']} tied" if gain["ties"] else ""
    return f"{_ci(gain['mean'], gain['ci'], 3, '+')} ({gain['wins']}/{gain['of']} wins{ties})"


def _usefulness_section(report: dict) -> list[str]:
    tstr, aug, ds = report["tstr"], report["augmentation"], report["dataset"]
    lines = ["## Are the samples useful? (augmentation gain and TSTR)", "",
             f"Three classifiers of the judge's recipe per seed at {aug.get('classifier_size')} px, tested on real val: "
             f"real train images alone; with classical augmentation "
             f"({', '.join(f'{k} {v}' for k, v in aug.get('recipe', {}).items() if v)}); and with "
             f"classical augmentation plus the {aug.get('generated_images', 0)} generated samples the export filter "
             "accepts. Within a seed they share initial weights, batch order and held-out split. Gains are mean paired "
             "differences of real-val top-1 with a 95 % interval over seeds and val images, and wins out of the seeds. "
             f"Note: {aug.get('generator', '')}.", ""]
    rows = []
    for name, regime in aug.get("regimes", {}).items():
        if "arms" not in regime:
            rows.append([name, regime.get("note"), None, None, None, None, None])
            continue
        per_user = regime["real_images_per_user"]
        label = f"{name} ({regime['real_images']} real{'' if per_user is None else f', {per_user} per user'})"
        arms = [_ci(regime["arms"][a]["top1"], regime["arms"][a]["top1_ci"]) for a in ARM_LABELS]
        rows.append([label, *arms, *(_gain_cell(regime["comparisons"][c])
                                     for c in ("classical-real", "generated-classical", "generated-real"))])
    if rows:
        lines += [_table(["regime", *ARM_LABELS.values(), "classical - real", "generated - classical",
                          "generated - real"], rows), ""]
    tstr_row = _ci(tstr.get("top1"), tstr.get("top1_ci"))
    if tstr.get("of_real") is not None:
        tstr_row += f", {_ci(tstr['of_real'], tstr.get('of_real_ci'), 2)} of real + classical"
    lines += [f"TSTR (the same recipe trained on generated images only, tested on real val; mean over seeds): "
              f"{tstr_row}. Chance: {_f(ds['chance'])}."]
    # A block's note adds only why a number is missing.
    lines += [f"\n{block['note']}" for block, key in ((tstr, "top1"), (aug, "gain"))
              if block.get("note") and block.get(key) is None]
    return lines + [""]


def _per_user_section(report: dict) -> list[str]:
    ident, fd, kid, man, memo = report["identity"], report["fd"], report["kid"], report["manifold"], report["memorization"]
    rows = []
    for user in report["dataset"]["users"]:
        n = str(user["number"])
        pu, gen = ident["per_user"][n], man["per_user"][n]["generated"] or {}
        rows.append([user["name"], user["n_train"], user["n_val"], user["n_generated"], pu["real_val_top1"],
                     pu["generated_top1"], fd["per_user"][n]["real_val"], fd["per_user"][n]["generated"],
                     kid["per_user"][n]["generated"], gen.get("precision"), gen.get("recall"),
                     report["diversity"]["per_user"][n]["ratio"], memo["per_user"][n],
                     report["export"]["per_user"].get(n) if report["export"].get("enabled") else None])
    header = ["user", "train", "val", "gen", "val top-1", "gen top-1", "FD val", "FD gen", "KID gen",
              "precision", "recall", "diversity ratio", "copy rate", "exported"]
    # A column with no value for any user (per-user FD/KID/PR below --min_user_samples, no export) is left
    # out and named once, rather than shown as a column of n/a.
    empty = [j for j in range(len(header)) if all(row[j] is None for row in rows)]
    keep = [j for j in range(len(header)) if j not in empty]
    lines = ["## Per user", "", _table([header[j] for j in keep], [[row[j] for j in keep] for row in rows]), ""]
    if empty:
        lines += [f"Not shown, no value for any user: {', '.join(header[j] for j in empty)} (per-user FD, KID, "
                  f"precision and recall need at least --min_user_samples {report['inputs']['min_user_samples']} "
                  "train and generated images per user; exported counts need --export_dir).", ""]
    return lines


def _export_section(report: dict) -> list[str]:
    ex = report["export"]
    if not ex.get("enabled"):
        return []
    return ["## Exported dataset", "",
            f"{ex['dir']}/train/<user>/ holds the real train images plus {ex['total']} of {ex['of']} generated "
            f"images (named micro_doppler_userNN_KKK.png) that the classifier assigns to their own user with "
            f"confidence in [{ex['min_confidence']}, {ex.get('max_confidence', 1.0)}] and margin (top-1 minus top-2 probability) >= {ex['min_margin']}; "
            f"{ex['excluded_as_copies']} confident images were left out as copies of training images. "
            f"{ex['dir']}/val/<user>/ holds the real val images. The folder is ready for stage 1 or any classifier.", ""]


def render_markdown(report: dict) -> str:
    out = (_intro(report) + _identity_section(report) + _distribution_section(report) + _memorization_section(report)
           + _usefulness_section(report) + _per_user_section(report) + _export_section(report))
    if report["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    out += ["## Plots", ""] + [f"- {name}: ![{name}]({file})" for name, file in report["plots"].items()] + [""]
    return "\n".join(out)


#################################################################################
#                                    Output                                     #
#################################################################################

def write_outputs(report: dict, output_dir: Path, users: list[User], train: ImageSet, gen: ImageSet,
                  nearest_pairs: list[tuple[int, int]]) -> dict:
    """Plots, then report.json and report.md; returns the report with the plots' file names added."""
    plots = {"confusion": "confusion.png", "per_user_accuracy": "per_user_accuracy.png",
             "samples": "samples.png", "nearest_neighbours": "nearest_neighbours.png"}
    plot_confusion(report, output_dir / plots["confusion"])
    plot_per_user_accuracy(report, output_dir / plots["per_user_accuracy"])
    plot_samples(users, train, gen, output_dir / plots["samples"])
    plot_nearest(report["memorization"]["closest"], nearest_pairs, train, gen, output_dir / plots["nearest_neighbours"])
    report = {**report, "plots": plots}
    write_text(output_dir / "report.json", json.dumps(report, indent=2))
    write_text(output_dir / "report.md", render_markdown(report))
    return report
