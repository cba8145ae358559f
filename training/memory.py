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
full/partial/LoRA), measured with measured_peak. This module is the pure estimate (and the checkpoint files'
sizes); what a user sees of it (--check_memory's report, the flags that would fit, the refusal before a CUDA
run) is training/memory_check.py.
"""
import gc
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from models.latent_classifier import NoisyLatentClassifier
from models.lightningdit import LightningDiT
from training.finetune import GRID_TABLES, is_lora_target, partial_trainable

GB = 1e9
F32 = 4
MIXED = ("16-mixed", "bf16-mixed")


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
    classifier = NoisyLatentClassifier(model_config["in_channels"], model_config["num_classes"])
    return sum(v.numel() for v in classifier.state_dict().values())


def checkpoint_report(setup: TrainingSetup) -> str:
    size = {k: v / GB for k, v in checkpoint_bytes(setup).items()}
    return (f"checkpoints on disk: last.ckpt {size['last']:.2f} GB, best.ckpt and early.ckpt {size['best']:.2f} GB "
            f"each; {size['peak']:.1f} GB while last.ckpt is rewritten")


#################################################################################
#                         Measuring (CPU, for the checks)                       #
#################################################################################

def measured_peak(fn) -> tuple[float, object]:
    """(peak bytes held by PyTorch's CPU allocator while fn() runs, above what was held before, fn's result).

    The profiler records every CPU allocation and free with its size; their running sum is exactly what
    torch holds (unlike RSS, which also counts the allocator's cached pages and the libraries).
    """
    gc.collect()   # else garbage of earlier work, freed during fn(), would count as negative allocations
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return float(peak), result
