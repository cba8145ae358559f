"""Every decision about whether and how a stage 2 run continues from its output folder: the devices asked for
(check_devices), --restart's removal of the previous run (prepare_output_dir, remove_previous_run), whether
last.ckpt is resumed and fits this command (resume_point: the same model, latents and LoRA adapters, flags a
resume can honour, the optimizer state's layout, a length not already passed), and, when training diverges,
what the message says about the checkpoint kept and the flags to change (divergence_message). The callbacks
that write the checkpoints and the flags stored in them (FLAGS_KEY, comparable_flags) are in
training/checkpoints.py."""
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from common.device import bf16_supported, check_cuda_usable, uses_cuda
from common.errors import PipelineError
from models.checkpoint import PipelineInfo, checkpoint_info, load_checkpoint
from training.checkpoints import FLAGS_KEY, comparable_flags
from training.cli import TrainOptions
from training.batches import steps_per_epoch
from training.dit_module import DiTTrainingModule
from training.divergence import MAX_SKIPPED_IN_A_ROW, NonFiniteLoss
from training.launch import check_world_size, rank_zero_first


def check_devices(args: TrainOptions) -> None:
    """GPUs asked for where CUDA is not usable, or a launcher (torchrun, srun) that started another number of
    processes than --devices x --num_nodes: a PipelineError saying what to do, before anything is loaded."""
    check_cuda_usable(args.accelerator, args.devices, args.num_nodes)
    check_world_size(args.devices, args.num_nodes)


def prepare_output_dir(args: TrainOptions, ckpt_dir: Path, log=print) -> None:
    """The output folder's once-per-run work, done by global rank 0 before any rank decides whether to resume
    (under torchrun and srun every rank starts at once; LOCAL_RANK is 0 once per node, and unset under srun)."""
    with rank_zero_first(args.devices, args.num_nodes, uses_cuda(args.accelerator)) as is_rank_zero:
        if is_rank_zero and args.restart:
            remove_previous_run(ckpt_dir, log)


def remove_previous_run(ckpt_dir: Path, log=print) -> None:
    """--restart: the old run's checkpoints go first, so that neither a stale best.ckpt (before the new
    run's first validation) nor a stale last.ckpt (resumed after an interruption) is ever picked up.
    Global rank 0 only (prepare_output_dir)."""
    for name in ("best.ckpt", "last.ckpt"):
        if (ckpt_dir / name).is_file():
            (ckpt_dir / name).unlink(missing_ok=True)
            log(f"--restart: removed the previous run's {ckpt_dir / name}")


def resume_point(args: TrainOptions, module: DiTTrainingModule, ckpt_dir: Path, launcher: bool,
                 log=print) -> str | None:
    """last.ckpt's path if this run resumes from it (after checking that it fits this command), else None.
    A fresh run's launching process (`launcher`: global rank 0) first removes a best.ckpt whose last.ckpt is
    gone: it is an earlier run's."""
    last, best = ckpt_dir / "last.ckpt", ckpt_dir / "best.ckpt"
    if not last.is_file():
        if launcher and best.is_file():
            best.unlink(missing_ok=True)
            log(f"removed {best}: its run's last.ckpt is gone, so it is an earlier run's")
        return None
    previous = load_checkpoint(last, mmap=True)
    saved = checkpoint_info(previous)
    check_same_model(saved.model_config, module.info.model_config, last)
    check_same_data(saved, module.info, last)
    check_same_lora(saved.lora, module.info.lora, last)
    module.info.latent_classifier = saved.latent_classifier   # trained on these latents: not trained again
    message = resume_message(previous, args, last)   # refuses the flags a resume cannot honour
    check_optimizer_layout(previous, module.param_groups(), last)
    epoch_steps = steps_per_epoch(len(module.train_x), args.batch_size, args.devices * args.num_nodes)
    check_length(previous, min(args.max_steps or math.inf, args.max_epochs * epoch_steps), last)
    log(message)
    # Batches are a function of the global step, so a mid-epoch resume is exact, which Lightning cannot know
    # (its warning, the same text on Lightning 2.2.1, 2.3.3, 2.4.0, 2.5.0 and 2.6.6, says it is not resumable).
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch")
    return str(last)


def check_same_model(saved: dict, current: dict, path: Path) -> None:
    """Resuming needs the architecture of the checkpoint; say which flags differ instead of a shape error."""
    keys = [k for k in sorted(set(saved) | set(current)) if k not in ("use_checkpoint", "class_dropout_prob")]
    diff = [f"{k}: {saved.get(k)} in the checkpoint, {current.get(k)} now"
            for k in keys if saved.get(k) != current.get(k)]
    if diff:
        raise PipelineError(f"{path} was trained with a different model ({'; '.join(diff)}). Resume with the "
                            "same --model/--depth/--hidden_size/--num_heads flags and stage 1 latents, or pass "
                            "--restart (or another --output_dir) to train the new model from scratch.")


def check_same_data(saved: PipelineInfo, current: PipelineInfo, path: Path) -> None:
    """Resuming on other latents (stage 1 redone on other images or with another tokenizer) would mix two
    runs: the weights learnt one normalisation and user table, the rest of the run would use another."""
    diff = []
    if saved.users != current.users or saved.user_numbers != current.user_numbers:
        diff.append(f"users: {saved.users} in the checkpoint, {current.users} now")
    if saved.tokenizer_sha256 != current.tokenizer_sha256:
        diff.append(f"tokenizer sha256: {str(saved.tokenizer_sha256)[:12]}... "
                    f"({saved.tokenizer or '?'}) in the checkpoint, "
                    f"{current.tokenizer_sha256[:12]}... ({current.tokenizer or '?'}) now")
    for key in ("latent_mean", "latent_std"):
        if not torch.equal(getattr(saved, key).cpu(), getattr(current, key).cpu()):
            diff.append(f"latent statistics ({key.split('_')[1]}) differ")
    if diff:
        raise PipelineError(f"{path} was trained on other stage 1 latents ({'; '.join(diff)}): stage 1 was "
                            "redone since. Pass --restart to train anew on the new latents (or use another "
                            "--output_dir to keep the old run).")


def check_same_lora(saved: dict | None, current: dict | None, path: Path) -> None:
    """Resuming a LoRA run needs the same adapters; raises PipelineError (naming the flags) instead of a
    state-dict key error."""
    if saved == current:
        return
    describe = lambda c: f"--finetune lora --lora_rank {c['rank']} --lora_alpha {c['alpha']:g}" if c else \
        "without --finetune lora"
    raise PipelineError(f"{path} was trained {describe(saved)}, this run is {describe(current)}. Resume with "
                        "the same flags, or pass --restart (or another --output_dir) to start over.")


# Flags a resume cannot honour: the weights come from last.ckpt, and the trained parameters (hence the
# optimizer state's layout) follow from them.
REFUSED = {"init_from": "the resumed weights started from the previous --init_from",
           "finetune": "the optimizer state belongs to the previous mode's trainable weights",
           "repa_weight": "the REPA projector and its optimizer state were trained with the previous weight",
           "repa_depth": "the REPA projector was trained on the previous block's tokens"}


def resume_message(checkpoint: dict[str, Any], args: TrainOptions, path: Path) -> str:
    """What a resume from `checkpoint` does with this command's flags; PipelineError for a flag it cannot honour.

    Every other flag applies from the resumed step on: the optimizer flags are set again after the optimizer
    state is restored (RunFlags), the others are read by the module and the Trainer each step.
    """
    step = checkpoint["global_step"]
    saved = checkpoint.get(FLAGS_KEY)
    if saved is None:   # written before checkpoints carried their flags
        return (f"resuming from {path} at step {step} (its flags were not recorded; this command's flags, "
                f"--lr and the other optimizer flags included, apply from step {step} on; pass --restart to "
                "start over)")
    now = comparable_flags(args)
    changed = {k: (saved.get(k), now[k]) for k in now if k in saved and saved[k] != now[k]}
    refused = [k for k in changed if k in REFUSED]
    if refused:
        raise PipelineError(f"{path} cannot resume with " + "; ".join(
            f"--{k} changed from {changed[k][0]} to {changed[k][1]} ({REFUSED[k]})" for k in refused)
            + ". Pass the previous value to continue, or --restart (or another --output_dir) to train anew.")
    if not changed:
        return f"resuming from {path} at step {step} with the same flags as before (pass --restart to start over)"
    listed = ", ".join(f"--{k} changed from {old} to {new}" for k, (old, new) in changed.items())
    return (f"resuming from {path} at step {step} with {listed}: the new values apply from step {step} on "
            "(pass --restart to start over)")


def check_optimizer_layout(checkpoint: dict[str, Any], param_groups: list[dict], path: Path) -> None:
    """The restored optimizer state must fit this run's parameter groups (torch would stop with a bare
    ValueError): --weight_decay 0 and > 0 group the parameters differently."""
    saved = [len(g["params"]) for g in checkpoint["optimizer_states"][0]["param_groups"]]
    now = [len(g["params"]) for g in param_groups]
    if saved != now:
        flags = checkpoint.get(FLAGS_KEY, {})
        hint = (f" (--weight_decay was {flags['weight_decay']})" if "weight_decay" in flags else "")
        raise PipelineError(
            f"{path} holds optimizer state for parameter groups of sizes {saved}, this command makes {now}: "
            f"--weight_decay 0 and > 0 group the parameters differently{hint}. Resume with a --weight_decay "
            "on the same side of 0, or pass --restart to train anew.")


def check_length(checkpoint: dict[str, Any], total_steps: int, path: Path) -> None:
    """A run already past this command's --max_steps/--max_epochs would end at once with more steps than asked."""
    if checkpoint["global_step"] > total_steps:
        raise PipelineError(f"{path} is at step {checkpoint['global_step']}, past the {total_steps} steps that "
                            "--max_steps/--max_epochs ask for. Pass --restart to train anew for that long, or "
                            "a larger --max_steps/--max_epochs to continue.")


def divergence_message(err: NonFiniteLoss, args: TrainOptions, precision: str, ckpt_dir: Path) -> str:
    """What diverged, the checkpoint that is kept (only one that exists), and flag changes that can help on this
    device: bf16-mixed only where bf16 is native (a T4 would turn it back into 16-mixed), --use_qknorm only
    without --init_from (the published weights have no q/k norms)."""
    if err.kind == "loss":
        what = f"the loss became NaN/inf by step {err.step} (precision {precision}, lr {args.lr:g})"
    elif err.kind == "skipped":
        what = (f"the loss or its gradients stayed NaN/inf for {MAX_SKIPPED_IN_A_ROW} steps in a row up to step "
                f"{err.step} (precision {precision}, lr {args.lr:g}; loss scaling skipped them, {err.skipped} "
                "skipped in all, and lowering the scale did not help)")
    else:
        what = f"the weights became NaN/inf by step {err.step} (precision {precision}, lr {args.lr:g})"
    last = ckpt_dir / "last.ckpt"
    if last.is_file():
        try:
            step = f" (step {load_checkpoint(last, mmap=True)['global_step']})"
        except PipelineError:   # the divergence is the news, not an unreadable file
            step = ""
        kept = (f"The last good checkpoint, {last}{step}, is kept: rerun with changed flags to continue "
                "from it (the same flags would diverge the same way: the batches are a function of the step), "
                "or add --restart to start over.")
    else:
        kept = ("No checkpoint was written before it (the first comes after "
                f"--checkpoint_every_n_steps {args.checkpoint_every_n_steps} steps or the first validation): "
                "rerun with changed flags.")
    advice = [f"a lower --lr (e.g. {args.lr / 4:g})"]
    if not args.grad_clip or args.grad_clip > 1.0:
        advice.append("--grad_clip 1.0")
    if precision == "16-mixed":
        native_bf16 = bf16_supported("cuda" if uses_cuda(args.accelerator) else "cpu")
        advice.append("--precision bf16-mixed (same speed, no fp16 overflow)" if native_bf16 else
                      "--precision 32-true (this device has no native bf16; fp32 is slower but does not overflow)")
    elif precision == "bf16-mixed":
        advice.append("--precision 32-true")
    if not args.use_qknorm and not args.init_from:   # published weights have no q/k norms to load
        advice.append("--use_qknorm (needs --restart: it changes the model)")
    tries = f"{', '.join(advice[:-1])} or {advice[-1]}" if len(advice) > 1 else advice[0]
    return f"training stopped: {what}. {kept} Try {tries}."
