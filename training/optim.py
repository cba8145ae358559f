"""Stage 2's optimizer: AdamW's parameter groups, the linear lr warm-up and the clipping of the true gradients.

The warm-up is a function of the global step applied before each optimizer step, not a torch lr scheduler: a
scheduler's state in last.ckpt would be one step behind (LastCheckpoint writes in on_train_batch_end, before
Lightning steps schedulers), and a resumed run would repeat an lr (tests/test_gpu_path.py resumes mid warm-up).
"""
import torch

BETA1 = 0.9


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float,
                 extra: torch.nn.Module | None = None) -> list[dict]:
    """AdamW's groups of the model's trainable parameters; with backbone_lr_scale < 1 the transformer blocks learn
    slower. `extra` (the REPA projector) is a last group at `lr`, so that the model's groups keep their places.

    With weight decay, norms, biases and the class table (null row included) go to groups without it: decaying
    them pulls gains and rows towards 0, not towards a simpler model. (Without, the groups stay as they were, so
    that earlier checkpoints' optimizer states still load.)
    """
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_backbone = name.startswith("blocks.") and "adaLN_modulation" not in name
        no_decay = weight_decay > 0 and (p.ndim < 2 or id(p) in embeddings)
        groups.setdefault((is_backbone, no_decay), []).append(p)
    layout = [{"params": params, "lr": lr * (backbone_lr_scale if is_backbone else 1.0),
               **({"weight_decay": 0.0} if no_decay else {})}
              for (is_backbone, no_decay), params in sorted(groups.items())]
    if extra is not None:
        layout.append({"params": list(extra.parameters()), "lr": lr})
    return layout


def adamw(groups: list[dict], lr: float, beta2: float, weight_decay: float) -> torch.optim.AdamW:
    """Fused AdamW on every device (CUDA, and CPU since torch 2.4): one kernel for the whole update, 3-4x faster
    than foreach on the CPU. The same construction everywhere, so the CPU tests run the GPU's. Each group keeps
    its lr as `base_lr`, which the warm-up ramps from."""
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(BETA1, beta2), weight_decay=weight_decay, fused=True)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return optimizer


def warm_up(optimizer: torch.optim.Optimizer, step: int, warmup_steps: int, lr: float) -> None:
    """Set each group's lr for optimizer step `step` (from 0): base_lr * min(1, (step + 1) / warmup_steps), or
    base_lr without a warm-up (`lr` for a group without base_lr)."""
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", lr) * ramp


def clip_true_gradients(optimizer: torch.optim.Optimizer, max_norm: float,
                        scaler: torch.amp.GradScaler | None) -> None:
    """Clip the global norm of the true (unscaled) gradients to max_norm.

    Lightning's own clipping refuses a fused optimizer under mixed precision ("does not allow for gradient
    clipping because it performs unscaling of gradients internally"): with fp16 loss scaling, fused AdamW would
    unscale inside its step, after the clip. So unscale here first; GradScaler records it, and its step() then
    hands the fused kernel no scale (still skipping the step on inf/NaN gradients).
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
