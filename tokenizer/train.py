"""Train a narrow VA-VAE tokenizer (the f16d32 architecture family) on spectrogram images: the image banks, the
batches of random crops, the optimisation loop, held-out PSNR, and the fp16 file with its metadata.

Used when the user has no published tokenizer, or wants a small one that ships with the project.
Loss: reconstruction + a tiny KL (as in LDM) + optionally the VA-VAE foundation-alignment term, LPIPS and a
PatchGAN adversarial term with LDM's adaptive weight (tokenizer/losses.py). What a run is made of before the
loop starts (architecture, defaults, model, texture terms, schedule, file split) is tokenizer/recipe.py.
"""
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from common.errors import PipelineError
from common.io import file_sha256
from common.lock import run_lock
from common.pixels import to_float
from common.progress import progress_bar
from data.images import load_bank
from models.vavae import VAVAE, reconstruction_psnr, save_vavae, storage_state_dict
from tokenizer.align import alignment_loss, alignment_term
from tokenizer.cli import TokenizerOptions
from tokenizer.early_stopping import EarlyStopping, StoredScorer
from tokenizer.recipe import (EVAL_IMAGES, Recipe, TextureTerms, build_tokenizer, eval_cadence, learning_rate,
                              resolve_recipe, set_trainable, split_files, texture_terms)

KL_WEIGHT = 1e-6            # LDM's weight on the KL of the summed per-image losses


#################################################################################
#                                  Evaluation                                   #
#################################################################################

def mean_reconstruction_psnr(model: VAVAE, images: torch.Tensor, batch_size: int = 32, autocast=nullcontext) -> float:
    """Mean held-out PSNR (dB); the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    value = reconstruction_psnr(model, images, batch_size, autocast).mean().item()
    model.train(was_training)
    return value


def spread(bank: torch.Tensor, count: int) -> torch.Tensor:
    """At most `count` rows of `bank`, evenly spaced: every user's share of a bank ordered by user."""
    if len(bank) <= count:
        return bank
    return bank[torch.linspace(0, len(bank) - 1, count).round().long().to(bank.device)]


#################################################################################
#                                   Training                                    #
#################################################################################

def random_crops(images: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random size x size window per image, offsets on the tokenizer's 16-px grid.

    Cheap (a 64-px crop is 1/16 of a 256-px image) but not free of cost in quality: GroupNorm over a crop
    sees other statistics than over a full frame (see tokenizer/recipe.py, FINETUNE), so full frames are the default.
    """
    full = images.shape[-1]
    if size >= full:
        return images
    cells = (full - size) // 16 + 1
    offsets = torch.randint(cells, (len(images), 2), generator=gen) * 16
    return torch.stack([im[:, y:y + size, x:x + size] for im, (y, x) in zip(images, offsets.tolist())])


@dataclass
class TrainingRun:
    """What the loop hands back: the logged losses, the periodic held-out PSNRs (step, dB), steps done, seconds
    taken, what ended it ("plateau", "clock" or "steps") and the step whose weights the model now holds (the best
    evaluation's with early stopping, else the last step's)."""
    history: list[dict]
    evals: list[tuple[int, float]]
    steps: int
    seconds: float
    stopped: str
    kept_step: int


def load_banks(data_dir: str | Path, val_fraction: float, image_size: int, device: torch.device,
               log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """The train and held-out images as uint8 banks, on the GPU when they fit there."""
    train_files, val_files = split_files(data_dir, val_fraction, log)
    t0 = time.time()
    train_bank, val_bank = load_bank(train_files, image_size, log=log), load_bank(val_files, image_size, log=log)
    if len(train_bank) == 0 or len(val_bank) == 0:
        raise PipelineError(f"no readable {'training' if len(train_bank) == 0 else 'validation'} images in {data_dir}.")
    log(f"loaded {len(train_bank)} train / {len(val_bank)} val images at {image_size}px in {time.time() - t0:.1f}s "
        f"({train_bank.numel() / 2**20:.0f} MiB as uint8); no flips (a flip reverses time in a spectrogram)")
    if train_bank.numel() < 4 * 2**30 and device.type == "cuda":
        train_bank, val_bank = train_bank.to(device), val_bank.to(device)   # batches are then just an index
    return train_bank, val_bank


def batch_sampler(bank: torch.Tensor, batch_size: int, crop_size: int,
                  gen: torch.Generator) -> Callable[[], torch.Tensor]:
    """A function giving the next batch of random crops: each image once per pass, in a new order each pass
    (drawn with replacement when the bank is smaller than a batch)."""
    order, pos = torch.randperm(len(bank), generator=gen), 0

    def next_batch() -> torch.Tensor:
        nonlocal order, pos
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(bank), generator=gen), 0
        if batch_size <= len(order):
            idx = order[pos:pos + batch_size]
        else:
            idx = torch.randint(len(order), (batch_size,), generator=gen)
        pos += batch_size
        return random_crops(bank[idx.to(bank.device)], crop_size, gen)
    return next_batch


def run_training(model: VAVAE, proj: nn.Module | None, fm: nn.Module | None, train_bank: torch.Tensor,
                 eval_bank: torch.Tensor, recipe: Recipe, *, steps: int, l1_weight: float,
                 align_weight: float, eval_every: int, max_minutes: float | None, compile_model: bool, seed: int,
                 log_every: int, progress: bool, texture: TextureTerms | None = None,
                 early_stop: EarlyStopping | None = None, log=print) -> TrainingRun:
    """The optimisation loop: AdamW, the warm-up + cosine schedule, gradient clipping, held-out PSNR on
    eval_bank (uint8, (N, 3, H, W)) every eval_every steps of the weights as stored (fp16); with a GAN, one
    discriminator step after each tokenizer step. With early_stop (patience > 0, eval_every > 0) it also ends
    on a plateau, the last weights are scored too, and the model ends holding the best-scored weights."""
    texture = texture or TextureTerms()
    adversary = texture.adversary
    device = recipe.device
    params, opt, step_fn = _optimisation(model, proj, fm, recipe, l1_weight, align_weight, compile_model, texture)
    gen = torch.Generator(device="cpu").manual_seed(seed)       # batch order and crop offsets
    batch_size = recipe.batch_size
    next_batch = batch_sampler(train_bank, batch_size, recipe.crop_size, gen)
    latent = recipe.crop_size // model.downsample_factor
    history, evals, notes = [], [], []
    score = StoredScorer(model, eval_bank, recipe.autocast) if eval_every else None
    early_stop = early_stop if early_stop is not None and early_stop.patience and eval_every else None
    start, done, stopped = time.time(), 0, "steps"
    # --max_minutes may end the run before `steps`, and early stopping before either: the bar's estimate follows
    # whichever ends it, and says "up to" where a plateau may come first
    bar = progress_bar(total=steps, budget_s=60 * max_minutes if max_minutes else None, disable=not progress,
                       upper_bound=early_stop is not None, desc="tokenizer", unit="step", dynamic_ncols=True)
    for step in range(1, steps + 1):
        elapsed = time.time() - start
        # the schedule with early stopping is this same cosine over the caps (learning_rate says why)
        frac = max(step / steps, elapsed / (60 * max_minutes) if max_minutes else 0.0)
        if frac > 1.0:
            notes.append(f"time budget of {max_minutes} min reached at step {step - 1}")
            stopped = "clock"
            break
        for group in opt.param_groups:
            group["lr"] = learning_rate(recipe.lr, recipe.warmup, step, frac)
        x = to_float(next_batch().to(device, non_blocking=True))
        noise = torch.randn(x.shape[0], model.config["embed_dim"], latent, latent, device=device)
        gan_on = adversary is not None and adversary.active(step)
        loss, parts, out = step_fn(x, noise, gan_on)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if adversary is not None:
            parts.update(adversary.discriminator_step(x, out))
        done = step
        if step % log_every == 0 or step == 1 or step == steps:
            vals = {k: v.item() for k, v in parts.items()}
            history.append({"step": step, **vals})
            bar.set_postfix(loss=f"{vals['loss']:.4f}", img_s=f"{step * batch_size / (time.time() - start):.1f}")
        bar.update(1)
        # the last step is scored after the loop: on every val image in any case (train_tokenizer), and first on
        # the eval bank with early stopping, where it competes for the weights kept
        if eval_every and step % eval_every == 0 and step != steps:
            state = storage_state_dict(model, half=True)
            p = score(state)
            evals.append((step, p))
            bar.write(f"step {step}: loss {history[-1]['loss']:.4f} (l1 {history[-1]['l1']:.4f} "
                      f"mse {history[-1]['mse']:.5f}) lr {opt.param_groups[0]['lr']:.2e} val PSNR {p:.2f} dB"
                      + gan_summary(history[-1]))
            if early_stop is not None and early_stop.update(step, p, state):
                notes.append(early_stop.stop_message(step, p))
                stopped = "plateau"
                break
            if early_stop is not None and (note := early_stop.below_floor_note()):
                with bar.external_write_mode():
                    log(note)
    bar.close()
    seconds = time.time() - start
    for note in notes:
        log(note)
    kept_step = done if early_stop is None else _keep_best(model, early_stop, evals, done, stopped, score, log)
    log(f"trained {done} steps x {batch_size} in {seconds:.0f}s ({done * batch_size / max(seconds, 1e-9):.1f} images/s)")
    return TrainingRun(history, evals, done, seconds, stopped, kept_step)


def _optimisation(model: VAVAE, proj: nn.Module | None, fm: nn.Module | None, recipe: Recipe, l1_weight: float,
                  align_weight: float, compile_model: bool,
                  texture: TextureTerms) -> tuple[list[nn.Parameter], torch.optim.Optimizer, Callable]:
    """(trained parameters, AdamW over them, the training step): the model in the device's fast memory layout."""
    channels_last = recipe.device.type == "cuda"        # NHWC convs are the fast path for cuDNN in bf16
    torch.backends.cudnn.benchmark = recipe.device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad] + (list(proj.parameters()) if proj is not None else [])
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step_fn = _make_step(model, proj, fm, recipe.autocast, l1_weight, align_weight, channels_last, texture)
    return params, opt, torch.compile(step_fn) if compile_model else step_fn


def _keep_best(model: VAVAE, early_stop: EarlyStopping, evals: list[tuple[int, float]], done: int, stopped: str,
               score: Callable, log=print) -> int:
    """End of an early-stopping run: a run that a cap ended has its last weights scored too (they compete for the
    weights kept); the model gets the best-scored weights. Returns their step."""
    if stopped != "plateau" and (not evals or evals[-1][0] != done):
        state = storage_state_dict(model, half=True)
        evals.append((done, score(state)))
        early_stop.update(done, evals[-1][1], state)
        log(f"step {done}: val PSNR {evals[-1][1]:.2f} dB")
    if stopped != "plateau":
        log(early_stop.kept_message())
    model.load_state_dict(early_stop.best_state)
    return early_stop.best_step


def gan_summary(logged: dict) -> str:
    """The GAN's state in a progress line: discriminator accuracy, and the decoder's term once it is on."""
    if "d_acc" not in logged:
        return ""
    on = f", g_loss {logged['g_loss']:.3f} x {logged['d_weight']:.3g}" if "g_loss" in logged else ", G term not yet on"
    return f"; D acc {logged['d_acc']:.2f}{on}"


def tokenizer_metadata(*, val_psnr: float, psnr_before: float | None, num_train: int, num_val: int,
                       run: TrainingRun, recipe: Recipe, seed: int, image_size: int, params: int,
                       align_weights: str | Path | None, custom_foundation: bool, aligned: bool, l1_weight: float,
                       align_weight: float, init_from: str | Path | None, decoder_only: bool,
                       texture: TextureTerms | None = None, early_stop: EarlyStopping | None = None,
                       eval_every: int = 0, eval_images: int = 0) -> dict:
    """The safetensors metadata of the written tokenizer: how it was trained and how well it reconstructs, what
    ended training (stopped: plateau, clock or steps) and whose weights it holds (kept_step)."""
    meta = {"val_psnr_db": round(val_psnr, 3), "num_train_images": num_train, "num_val_images": num_val,
            "steps": run.steps, "stopped": run.stopped, "kept_step": run.kept_step, "batch_size": recipe.batch_size,
            "lr": recipe.lr, "seconds": round(run.seconds, 1),
            "seed": seed, "precision": recipe.precision, "image_size": image_size, "crop_size": recipe.crop_size,
            "params": params,
            "align": str(Path(align_weights).name) if align_weights else ("custom" if custom_foundation else "off"),
            "loss": f"mse + {l1_weight} l1 + {KL_WEIGHT} kl" + (f" + {align_weight} vf" if aligned else ""),
            "written_by": "train_tokenizer.py"}
    if early_stop is not None:
        meta.update(early_stop_patience=early_stop.patience, early_stop_min_delta_db=early_stop.min_delta_db,
                    early_stop_floor_db=early_stop.floor_db, eval_every=eval_every, eval_images=eval_images,
                    kept_eval_psnr_db=round(early_stop.best_db, 3))
    texture = texture or TextureTerms()
    if texture.lpips is not None:
        meta["loss"] += f" + {texture.perceptual_weight} lpips"
        meta.update(perceptual_weight=texture.perceptual_weight, lpips=texture.lpips_source)
    if texture.adversary is not None:
        adv = texture.adversary
        meta["loss"] += f" + {adv.weight} adaptive hinge-gan after step {adv.start}"
        meta.update(disc_weight=adv.weight, disc_start=adv.start, disc_lr=adv.opt.param_groups[0]["lr"],
                    disc=texture.disc_source)
    if init_from is not None:
        meta.update(init_from=Path(init_from).name, init_sha256=file_sha256(init_from), decoder_only=decoder_only,
                    val_psnr_before_db=round(psnr_before, 3))
    return meta


def train_tokenizer(options: TokenizerOptions, *, foundation: Callable[[], nn.Module] | None = None,
                    max_val_images: int = EVAL_IMAGES, log_every: int = 25, progress: bool = True,
                    log=print) -> dict:
    """The tokenizer trainer with its flags (tokenizer/cli.py): train (or fine-tune), report held-out PSNR
    before and after, write fp16 safetensors to options.output_path; returns a summary. The periodic
    evaluations score max_val_images val images spread over the users; with --early_stop_patience the run may
    end on a plateau and the file holds the best-scored weights. `foundation` (tests): a module in place of
    --align_weights' network. Raises PipelineError for another run writing the same output_path (its
    lock_path), or for early stopping without evaluations."""
    o = options
    with run_lock(lock_path(o.output_path), "tokenizer training", "another --output_path", log=log):
        recipe = resolve_recipe(o.init_from, o.image_size, o.lr, o.warmup, o.crop_size, o.batch_size, o.device,
                                o.precision, o.decoder_only)
        eval_every = eval_cadence(o.eval_every, o.early_stop_patience)
        early_stop = EarlyStopping(o.early_stop_patience, o.early_stop_min_delta_db, o.early_stop_floor_db) \
            if o.early_stop_patience else None
        torch.manual_seed(o.seed)
        model = build_tokenizer(o.init_from, o.width, o.num_res_blocks, o.image_size, log).to(recipe.device).train()
        # before the images load: a missing VGG-16 or a too-small crop fails at once
        texture = texture_terms(o.init_from, recipe, o.perceptual_weight, o.lpips_vgg, o.disc_weight, o.disc_start,
                                o.disc_lr, log)
        train_bank, val_bank = load_banks(o.data_dir, o.val_fraction, o.image_size, recipe.device, log)
        psnr_before = None
        if o.init_from is not None:
            psnr_before = mean_reconstruction_psnr(model, val_bank, autocast=recipe.autocast)
            log(f"held-out PSNR before fine-tuning: {psnr_before:.2f} dB")
        n_params = set_trainable(model, o.decoder_only, o.image_size, recipe.crop_size, log)
        fm, proj = alignment_term(foundation, o.align_weights, o.align_weight, model.config["embed_dim"], o.image_size,
                                  recipe.device, log)

        eval_bank = spread(val_bank, max_val_images)
        if early_stop is not None:
            caps = f"--steps {o.steps}" + (f" or --max_minutes {o.max_minutes:g}" if o.max_minutes else "")
            log(f"early stopping: held-out PSNR over {len(eval_bank)} val images every {eval_every} steps; stops "
                f"after {early_stop.patience} evaluations without a rise of more than {early_stop.min_delta_db:g} dB "
                f"once at or above {early_stop.floor_db:g} dB, else at {caps}; keeps the best-scored weights")
        run = run_training(model, proj, fm, train_bank, eval_bank, recipe, steps=o.steps,
                           l1_weight=o.l1_weight, align_weight=o.align_weight, eval_every=eval_every,
                           max_minutes=o.max_minutes, compile_model=o.compile, seed=o.seed, log_every=log_every,
                           progress=progress, texture=texture, early_stop=early_stop, log=log)

        # The file stores fp16 weights: measure the model the file holds, so that the PSNR in its metadata is the
        # PSNR anyone reloading it measures (fp32 weights scored ~0.002 dB apart from their fp16 rounding).
        round_to_fp16_storage(model)
        val_psnr = mean_reconstruction_psnr(model, val_bank, autocast=recipe.autocast)
        change = f" (from {psnr_before:.2f} dB before fine-tuning)" if psnr_before is not None else ""
        log(f"held-out PSNR over {len(val_bank)} val images never trained on: {val_psnr:.2f} dB{change}")
        meta = tokenizer_metadata(val_psnr=val_psnr, psnr_before=psnr_before, num_train=len(train_bank),
                                  num_val=len(val_bank), run=run, recipe=recipe, seed=o.seed,
                                  image_size=o.image_size, params=n_params, align_weights=o.align_weights,
                                  custom_foundation=foundation is not None, aligned=fm is not None,
                                  l1_weight=o.l1_weight, align_weight=o.align_weight, init_from=o.init_from,
                                  decoder_only=o.decoder_only, texture=texture, early_stop=early_stop,
                                  eval_every=eval_every, eval_images=len(eval_bank))
        save_vavae(model.cpu(), o.output_path, meta, half=True)
        size = Path(o.output_path).stat().st_size
        log(f"wrote {o.output_path} ({size / 2**20:.2f} MiB, fp16 weights)")
        return {"val_psnr_db": val_psnr, "val_psnr_before_db": psnr_before, "history": run.history, "evals": run.evals,
                "file_bytes": size, "params": n_params, "steps": run.steps, "seconds": run.seconds,
                "config": model.config, "stopped": run.stopped, "kept_step": run.kept_step}


def lock_path(output_path: str | Path) -> Path:
    """The lock of a tokenizer run: `<output_path>.lock` beside the file it will write."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.name + ".lock")


def round_to_fp16_storage(model: VAVAE) -> None:
    """In place: every weight and buffer becomes its fp16 value (kept in fp32) in the contiguous layout, i.e.
    exactly the model that save_vavae(..., half=True) writes and load_vavae reads back."""
    model.to(memory_format=torch.contiguous_format).float()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half())


def _make_step(model, proj, fm, autocast, l1_weight, align_weight, channels_last, texture: TextureTerms):
    """The forward of one training step -> (loss, detached parts, reconstruction)."""
    def step(x: torch.Tensor, noise: torch.Tensor, gan_on: bool = False):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            mean, logvar = model.encode_posterior(x)
            z = mean + torch.exp(0.5 * logvar) * noise          # reparameterised posterior sample
            out = model.decode(z).float()
        err = out - x
        # PSNR is an MSE metric, so MSE carries the objective; the small L1 term keeps a steady gradient on
        # the many near-correct pixels (its gradient does not fade with the error) and sharpens edges.
        # Pixel losses alone blur speckle (the mean of plausible textures is smooth): LPIPS and the GAN, when
        # on, pay for texture.
        mse, l1 = err.pow(2).mean(), err.abs().mean()
        rec = mse + l1_weight * l1
        parts = {"mse": mse, "l1": l1}
        if texture.lpips is not None:
            with autocast():
                lpips = texture.lpips(out, x).mean()
            rec = rec + texture.perceptual_weight * lpips
            parts["lpips"] = lpips
        # KL summed per image, then divided by the pixel count: the same ratio to the reconstruction
        # term as LDM's kl_weight on per-image *summed* losses.
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).flatten(1).sum(1).mean()
        loss = rec + KL_WEIGHT * kl / x[0].numel()
        parts.update(loss=loss, kl=kl)
        if fm is not None:
            with torch.no_grad(), autocast():
                feats = fm(x)
            mcos, mdms = alignment_loss(mean, proj, feats)
            # VA-VAE's adaptive weight: scale the term so its gradient on the latent is align_weight times
            # the reconstruction's, whatever the loss magnitudes (costs one extra decoder backward).
            rec_grad = torch.autograd.grad(loss, mean, retain_graph=True)[0]
            vf_grad = torch.autograd.grad(mcos + mdms, mean, retain_graph=True)[0]
            adaptive = (rec_grad.norm() / vf_grad.norm().clamp_min(1e-8)).clamp(max=1e4).detach()
            loss = loss + align_weight * adaptive * (mcos + mdms)
            parts.update(loss=loss, vf_cos=mcos, vf_dist=mdms, vf_scale=adaptive)
        if gan_on:
            gan, gan_parts = texture.adversary.generator_term(out, rec, model.decoder.conv_out.weight)
            loss = loss + gan
            parts.update(loss=loss, **gan_parts)
        return loss, {k: v.detach() for k, v in parts.items()}, out.detach()
    return step
