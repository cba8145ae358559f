"""Peak memory of a stage 2 training step per device, estimated from the flags before anything is allocated.

A T4 user who asks for LightningDiT-XL/1 should hear in a second that it does not fit, and which flags
would, instead of a CUDA out-of-memory error minutes later. The estimate adds up:

  always     weights (trainable fp32; LoRA's frozen base in half precision on a GPU), the EMA (a full copy,
             or only the trainable tensors with LoRA), AdamW's two moments, the gradients (Lightning sets
             them to None only after the next forward, so they live through it), DDP's gradient buckets,
             the latents kept on the device;
  peak 1     forward/backward: the activations autograd keeps (derived tensor by tensor from
             LightningDiTBlock in block_activation_bytes), autocast's half copies of fp32 weights, the
             backward's working tensors;
  peak 2     optimizer step: foreach AdamW's temporaries (none when fused, as on CUDA).

The estimate is always + the larger peak. tests/test_memory.py checks it against the peak that PyTorch's
CPU allocator measures over real training steps (fp32 and bf16 autocast, with and without checkpointing,
full/partial/LoRA).
"""
import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from common.device import resolve_precision
from models.lightningdit import LightningDiT, LightningDiT_models, model_config
from training.finetune import GRID_TABLES, is_lora_target, partial_trainable

GB = 1e9
F32 = 4
MIXED = ("16-mixed", "bf16-mixed")
# Without stage 1 output: VA-VAE f16d32 latents of 256x256 images, 31 users with ~150 images each.
DEFAULT_LATENT = dict(in_channels=32, input_size=16, users=31, latents=31 * 150)


@dataclass
class TrainingSetup:
    """What the peak depends on: the model, the batch per device and the stage 2 flags."""
    model_config: dict
    batch_size: int
    precision: str = "32-true"
    grad_checkpointing: bool = False
    finetune: str = "full"               # full (also from scratch), partial, lora
    lora_rank: int = 16
    devices: int = 1
    num_latents: int = 0                 # train + val latents, kept on the device
    fused_adam: bool = True              # CUDA: no foreach temporaries
    half_base: bool = True               # LoRA's frozen base in the autocast dtype (CUDA, mixed precision)
    latent_classifier: bool = True       # the noisy-latent user classifier stored in every checkpoint

    @property
    def act_bytes(self) -> int:
        return 2 if self.precision in MIXED else F32


@dataclass
class MemoryEstimate:
    setup: TrainingSetup
    static: list[tuple[str, float]] = field(default_factory=list)
    forward: list[tuple[str, float]] = field(default_factory=list)
    step: list[tuple[str, float]] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(b for _, b in self.static) + max(sum(b for _, b in self.forward), sum(b for _, b in self.step))

    def table(self, budget: float | None = None) -> str:
        lines = []
        for title, rows in (("always", self.static), ("forward/backward (peak 1)", self.forward),
                            ("optimizer step (peak 2)", self.step)):
            if rows:
                lines.append(f"  {title}")
                lines += [f"    {name:<66}{b / GB:7.2f} GB" for name, b in rows]
        verdict = "" if budget is None else (f"  (budget {budget / GB:.1f} GB: "
                                             + ("fits)" if self.total <= budget else "does NOT fit)"))
        lines.append(f"  {'peak estimate (always + larger peak)':<68}{self.total / GB:7.2f} GB{verdict}")
        return "\n".join(lines)


#################################################################################
#                                 Parameters                                    #
#################################################################################

def meta_model(config: dict) -> LightningDiT:
    """The model on the meta device: exact parameter names and shapes, no memory, instant even for XL."""
    with torch.device("meta"):
        return LightningDiT(**{**config, "use_checkpoint": False})


@dataclass
class ParamCounts:
    trainable: int = 0          # fp32, with gradients, Adam state and EMA
    frozen_f32: int = 0
    frozen_half: int = 0        # LoRA base projections on a GPU in mixed precision
    total_base: int = 0         # the model's own parameters (before adapters)
    buffers: int = 0            # persistent buffers (saved with the weights, e.g. the RoPE tables)
    half_copies: int = 0        # fp32 matrix weights autocast keeps a half copy of (mixed precision)


def count_parameters(setup: TrainingSetup) -> ParamCounts:
    model = meta_model(setup.model_config)
    counts = ParamCounts()
    lora = setup.finetune == "lora"
    half_base = lora and setup.half_base and setup.precision in MIXED
    lora_targets = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_lora_target(n)}
    for name, p in model.named_parameters():
        counts.total_base += p.numel()
        module_name = name.rsplit(".", 1)[0]
        if name in GRID_TABLES:
            trainable = False
        elif setup.finetune == "partial" or lora:
            trainable = partial_trainable(name)
        else:
            trainable = True
        in_lora_base = lora and module_name in lora_targets
        if trainable:
            counts.trainable += p.numel()
        elif in_lora_base and half_base:
            counts.frozen_half += p.numel()
        else:
            counts.frozen_f32 += p.numel()
        # autocast casts each fp32 Linear/Conv weight once per forward (cached while it trains; saved for
        # the input gradient while frozen); a half-stored base needs no copy.
        if p.dim() >= 2 and name != "pos_embed" and name != "y_embedder.embedding_table.weight" \
                and not (in_lora_base and half_base) and (trainable or not setup.grad_checkpointing):
            counts.half_copies += p.numel()
    if lora:
        adapters = sum(setup.lora_rank * (m.in_features + m.out_features)
                       for n, m in model.named_modules() if n in lora_targets)
        counts.trainable += adapters
        counts.half_copies += adapters
    params = {name for name, _ in model.named_parameters()}
    counts.buffers = sum(t.numel() for name, t in model.state_dict().items() if name not in params)
    return counts


def ema_bytes(setup: TrainingSetup, counts: ParamCounts) -> int:
    """What the EMA adds to the weights: a full copy, except with LoRA, where it shares the frozen tensors."""
    return F32 * counts.trainable if setup.finetune == "lora" else F32 * counts.total_base


#################################################################################
#                                 Activations                                   #
#################################################################################

def block_activation_bytes(setup: TrainingSetup) -> tuple[float, float]:
    """(bytes autograd keeps per token for one LightningDiTBlock, bytes of the backward's working tensors
    per token), following the block's forward op by op. a = autocast dtype size (2 mixed, 4 fp32)."""
    cfg = setup.model_config
    d, heads = cfg["hidden_size"], cfg["num_heads"]
    mlp_hidden = int(d * cfg.get("mlp_ratio", 4.0))
    swiglu = cfg.get("use_swiglu", True)
    h = int(2 / 3 * mlp_hidden) if swiglu else mlp_hidden
    a, mixed = setup.act_bytes, setup.precision in MIXED
    lora = setup.finetune == "lora"
    weights_train = setup.finetune == "full"
    r = setup.lora_rank if lora else 0

    def linear_input(width: int, input_is_f32: bool) -> float:
        """A Linear keeps its input for the weight gradient (only when the weight trains). Under autocast
        an fp32 input is cast first and the half copy is kept; peft's lora_A casts it again (its own copy)."""
        if mixed:
            return (weights_train + lora) * width * a if input_is_f32 else \
                (weights_train * width * a + lora * width * a)
        return (weights_train or lora) * width * F32

    kept = (
        2 * d * F32                         # norm1/norm2: normalised y in fp32 (+ 1/rms, negligible)
        + linear_input(d, True)             # qkv input (the modulated fp32 norm output)
        + 3 * d * a                         # qkv output: v is a view of it, kept by SDPA
        + 2 * d * a                         # q, k after RoPE, kept by SDPA
        + d * a + heads * F32               # SDPA output (kept; it is also proj's input) and logsumexp
        + lora * d * a                      # proj input cast again by peft/autocast for lora_A
        + d * a                             # proj output, kept by the gated residual (gate's gradient)
        + linear_input(d, True)             # w12 input
        + (2 * h * a + h * a if swiglu else h * a)   # w12 output (x1, x2 views), silu(x1) / fc1 output
        + linear_input(h, False)            # w3 / fc2 input (silu(x1) * x2, already half under autocast)
        + d * a                             # mlp output, kept by the gated residual
        + 4 * r * a                         # lora_A outputs, kept by lora_B
    )
    # Backward of one block: the residual stream's gradient and the RMSNorm backward's terms, in fp32
    # (measured: 3.5-6 of these per token at the start of the backward).
    working = 6 * d * F32
    return kept, working


def activation_rows(setup: TrainingSetup) -> list[tuple[str, float]]:
    cfg = setup.model_config
    tokens_per_sample = (cfg["input_size"] // cfg["patch_size"]) ** 2
    tokens = setup.batch_size * tokens_per_sample
    d, depth = cfg["hidden_size"], cfg["depth"]
    kept, working = block_activation_bytes(setup)
    latent = setup.batch_size * cfg["in_channels"] * cfg["input_size"] ** 2
    # Outside the blocks: embedder output, final norm (fp32 y) and linear input, and the loss's tensors.
    outside = tokens * (2 * d * F32 + d * setup.act_bytes) + 8 * latent * F32
    if setup.grad_checkpointing:
        stored = depth * tokens * d * F32            # each block's input; one block recomputed at a time
        rows = [(f"activations: {depth} checkpointed block inputs + 1 block recomputed", stored + tokens * kept)]
    else:
        rows = [(f"activations: {depth} blocks x {kept * tokens / GB * 1e3:.0f} MB kept for backward",
                 depth * tokens * kept)]
    rows[0] = (rows[0][0], rows[0][1] + outside)
    rows.append(("backward working tensors", tokens * working))
    return rows


#################################################################################
#                                   Estimate                                    #
#################################################################################

def estimate_memory(setup: TrainingSetup) -> MemoryEstimate:
    counts = count_parameters(setup)
    est = MemoryEstimate(setup)
    n_train, lora = counts.trainable, setup.finetune == "lora"
    weight_bytes = F32 * (n_train + counts.frozen_f32) + 2 * counts.frozen_half
    half = f", {counts.frozen_half / 1e6:.0f}M frozen in half" if counts.frozen_half else ""
    est.static.append((f"weights ({n_train / 1e6:.1f}M trainable{half}, "
                       f"{counts.frozen_f32 / 1e6:.1f}M frozen fp32)", weight_bytes))
    est.static.append(("EMA " + ("(trainable tensors only)" if lora else "(full copy)"), ema_bytes(setup, counts)))
    est.static.append(("AdamW moments (2 x trainable, fp32)", 2 * F32 * n_train))
    latent_elems = setup.model_config["in_channels"] * setup.model_config["input_size"] ** 2
    if setup.num_latents:
        est.static.append((f"{setup.num_latents} latents on the device (+ fixed val noise)",
                           1.2 * F32 * setup.num_latents * latent_elems))
    est.forward = activation_rows(setup)
    if setup.precision in MIXED:
        est.forward.append(("half copies of fp32 weights (autocast)", 2 * counts.half_copies))
    # Lightning zeroes the gradients after the next forward, so they are held through it as well.
    est.static.append(("gradients (fp32, held from one backward into the next forward)", F32 * n_train))
    if setup.devices > 1:
        est.static.append(("DDP gradient buckets", F32 * n_train))
    if not setup.fused_adam:
        est.step.append(("foreach AdamW temporaries (fused on CUDA: none)", F32 * n_train))
    return est


#################################################################################
#                                Checkpoint files                               #
#################################################################################

def checkpoint_bytes(setup: TrainingSetup) -> dict[str, int]:
    """Bytes of the tensors in stage 2's checkpoint files (training/checkpoints.py), from the parameter counts.

    last.ckpt holds the weights, the EMA (LoRA: only its trainable tensors; torch.save stores the shared frozen
    ones once) and AdamW's two moments; best.ckpt and early.ckpt the EMA weights only. 'peak' is the disk in
    use while last.ckpt is rewritten: all three plus the temporary beside last.ckpt (common/io.atomic_path).
    The files add a few hundred bytes per tensor and kilobytes of training state to these.
    """
    counts = count_parameters(setup)
    # Every file carries the user classifier in its pipeline entry (a few MB: float32 weights).
    classifier = F32 * classifier_parameters(setup.model_config) if setup.latent_classifier else 0
    weights = F32 * (counts.trainable + counts.frozen_f32 + counts.buffers) + 2 * counts.frozen_half + classifier
    last = weights + ema_bytes(setup, counts) + F32 * counts.buffers + 2 * F32 * counts.trainable
    # The EMA model has the weights' layout: best/early are the size of the weights.
    return {"best": weights, "early": weights, "last": last, "peak": 2 * last + 2 * weights}


def classifier_parameters(model_config: dict) -> int:
    """Parameters in the state dict of stage 2's noisy-latent user classifier for this model's latents and users."""
    from models.latent_classifier import NoisyLatentClassifier
    classifier = NoisyLatentClassifier(model_config["in_channels"], model_config["num_classes"])
    return sum(v.numel() for v in classifier.state_dict().values())


def checkpoint_report(setup: TrainingSetup) -> str:
    size = {k: v / GB for k, v in checkpoint_bytes(setup).items()}
    return (f"checkpoints on disk: last.ckpt {size['last']:.2f} GB, best.ckpt and early.ckpt {size['best']:.2f} GB "
            f"each; {size['peak']:.1f} GB while last.ckpt is rewritten")


#################################################################################
#                          Flags -> setup, suggestions                          #
#################################################################################

def setup_from_args(args: argparse.Namespace, cuda: bool = True) -> tuple[TrainingSetup, str]:
    """The setup stage 2 would train with these flags; the second value says where data sizes came from."""
    in_channels, input_size, users, n = (DEFAULT_LATENT[k] for k in ("in_channels", "input_size", "users", "latents"))
    source = ("no stage 1 output read: assuming 32x16x16 latents (VA-VAE f16d32, 256 px), "
              f"{users} users, {n} latents")
    latent_dir = Path(args.latent_dir) if getattr(args, "latent_dir", None) else None
    if latent_dir is not None and (latent_dir / "train.safetensors").is_file():
        shapes = {}
        for split in ("train", "val"):
            path = latent_dir / f"{split}.safetensors"
            if path.is_file():
                shapes[split] = read_header(path)
        train = shapes["train"]
        _, in_channels, input_size, _ = train["latents"]["shape"]
        users = len(json.loads(train["__metadata__"].get("users", "[]"))) or users
        n = sum(s["latents"]["shape"][0] for s in shapes.values())
        source = f"from {latent_dir}: {in_channels}x{input_size}x{input_size} latents, {users} users, {n} latents"
    config = model_config(args.model, num_classes=users, input_size=input_size, in_channels=in_channels,
                          depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads)
    # What stage 2 would train in (the same resolver); on a machine without CUDA, cuda=True asks about a GPU
    # run in general, where 16-mixed and bf16-mixed need the same memory.
    precision = resolve_precision(args.precision, "cuda" if cuda else "cpu", warn=False)
    return TrainingSetup(config, args.batch_size, precision, bool(args.grad_checkpointing),
                         args.finetune if args.init_from or args.finetune == "lora" else "full",
                         args.lora_rank, args.devices, n, fused_adam=cuda, half_base=cuda,
                         latent_classifier=args.classifier_steps > 0), source


def read_header(path: Path) -> dict:
    """A safetensors file's JSON header (shapes and metadata) without reading any tensor."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size))


def suggestions(setup: TrainingSetup, budget: float, has_init_from: bool) -> list[str]:
    """Flag changes that fit the budget, smallest change first."""
    def fits(change: dict) -> bool:
        return estimate_memory(_with(setup, **change)).total <= budget

    ckpt, ckpt_flag = ({}, "") if setup.grad_checkpointing else ({"grad_checkpointing": True}, " --grad_checkpointing")
    found = []
    if ckpt and fits(ckpt):
        found.append("--grad_checkpointing")
    if setup.finetune != "lora":
        needs = "" if has_init_from else " (with --init_from and the published weights)"
        for change, flags in (({"finetune": "lora"}, "--finetune lora"),
                              ({"finetune": "lora", **ckpt}, "--finetune lora" + ckpt_flag)):
            if fits(change):
                found.append(flags + needs)
                break
    batch = largest_batch(setup, budget, **ckpt)
    if 0 < batch < setup.batch_size:
        found.append(f"--batch_size {batch}{ckpt_flag}")
    if not has_init_from:   # the model must match the weights of --init_from
        for name in smaller_models(setup.model_config):
            config = model_config(name, **{k: setup.model_config[k] for k in ("num_classes", "input_size", "in_channels")})
            if fits({"model_config": config, **ckpt}):
                found.append(f"--model {name}{ckpt_flag}")
                break
    return found


def largest_batch(setup: TrainingSetup, budget: float, **change) -> int:
    """The largest power-of-two batch per device (<= the current one) that fits; 0 if even 1 does not."""
    batch = 1 << max(0, setup.batch_size.bit_length() - 1)
    while batch >= 1:
        if estimate_memory(_with(setup, batch_size=batch, **change)).total <= budget:
            return batch
        batch //= 2
    return 0


def smaller_models(config: dict) -> list[str]:
    """Named sizes with fewer parameters-times-tokens than `config`, largest first."""
    cost = lambda c: c["depth"] * c["hidden_size"] ** 2 * (config["input_size"] // c["patch_size"]) ** 2
    ours = cost(config)
    named = sorted(LightningDiT_models, key=lambda n: cost(LightningDiT_models[n]), reverse=True)
    return [n for n in named if cost(LightningDiT_models[n]) < ours]


def _with(setup: TrainingSetup, **change) -> TrainingSetup:
    return TrainingSetup(**{**setup.__dict__, **change})


def describe(setup: TrainingSetup) -> str:
    cfg = setup.model_config
    mode = {"full": "full training", "partial": "--finetune partial",
            "lora": f"--finetune lora (rank {setup.lora_rank})"}[setup.finetune]
    return (f"depth {cfg['depth']}, hidden {cfg['hidden_size']}, patch {cfg['patch_size']}, batch "
            f"{setup.batch_size} per device, {setup.precision}, {mode}"
            + (", --grad_checkpointing" if setup.grad_checkpointing else "")
            + (f", {setup.devices} devices (DDP)" if setup.devices > 1 else ""))


def memory_report(args: argparse.Namespace, budget: float, cuda: bool = True) -> tuple[bool, str, float]:
    """(fits, the table to print with the flags that would fit otherwise, the estimate) for stage 2's flags."""
    setup, source = setup_from_args(args, cuda)
    est = estimate_memory(setup)
    text = [f"estimated peak memory per device for {args.model} ({describe(setup)}); {source}",
            est.table(budget), checkpoint_report(setup)]
    fits = est.total <= budget
    if not fits:
        found = suggestions(setup, budget, bool(args.init_from))
        text.append(f"flags that fit {budget / GB:.1f} GB: " + "; ".join(found) if found else
                    "no single change fits: combine a smaller --model, --batch_size and --grad_checkpointing")
    return fits, "\n".join(text), est.total


def check_cuda_memory(args: argparse.Namespace, log=print) -> None:
    """Before a CUDA training: refuse (with advice) a run whose estimate exceeds this device's free memory."""
    from common.errors import PipelineError
    from training.launch import local_rank
    # This rank's GPU, as Lightning assigns them (srun sets SLURM_LOCALID, not LOCAL_RANK); modulo for a task
    # that sees only its own GPU (srun --gpus-per-task, CUDA_VISIBLE_DEVICES per rank).
    device = local_rank() % max(1, torch.cuda.device_count())
    free, total = torch.cuda.mem_get_info(device)
    fits, text, estimate = memory_report(args, free)
    if not fits:
        raise PipelineError(f"this run needs more memory than cuda:{device} has free ({free / GB:.1f} of "
                            f"{total / GB:.1f} GB).\n{text}\n(--skip_memory_check trains anyway)")
    log(f"memory check: estimated peak {estimate / GB:.1f} GB, {free / GB:.1f} GB free on cuda:{device}")


#################################################################################
#                         Measuring (CPU, for the checks)                       #
#################################################################################

def measured_peak(fn) -> tuple[float, object]:
    """(peak bytes held by PyTorch's CPU allocator while fn() runs, above what was held before, fn's result).

    The profiler records every CPU allocation and free with its size; their running sum is exactly what
    torch holds (unlike RSS, which also counts the allocator's cached pages and the libraries).
    """
    import gc
    from torch.profiler import ProfilerActivity, profile
    gc.collect()   # else garbage of earlier work, freed during fn(), would count as negative allocations
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return float(peak), result
