"""Stage 2 training throughput: latents/s, peak memory and MFU of DiTTrainingModule's step per model size,
and (CPU, eager) the speed of the same step with the reference LightningDiT (hustvl/LightningDiT) model.

One timed step is exactly the training work of a Lightning step: DiTTrainingModule.training_step
(batch gather, timesteps, noise, forward, flow-matching loss) under the chosen autocast, backward,
the module's own AdamW (fused, as in training), its EMA update and zero_grad.

Model FLOPs per latent (documented estimate, used for MFU; matmul FLOPs only, 2 per multiply-add):
    forward  = 2 * P_token * T + 2 * P_cond + 4 * L * T^2 * D   (T tokens, L blocks, width D)
    training = 3 * forward                                       (backward = 2 * forward)
           = 6 * P_token * T + 6 * P_cond + 12 * L * T^2 * D
P_token are the weights applied to every token (patch embed, qkv, proj, MLP, final linear); P_cond the
ones applied once per latent (adaLN modulations, timestep MLP). The adaLN weights are a third of a
block's parameters, so the common "6 * all params * T" would overstate the work by ~40%; that number is
reported too (flops_6NT). Attention: QK^T and AV are 2*T^2*D each per block in the forward.

Example:
    python benchmarks/bench_train.py --sizes S/2,B/2 --batch_size 8 --reference_dir /tmp/ref_lightningdit
    python benchmarks/bench_train.py --device cuda --sizes XL/1 --precision bf16 --compile --json_out x.json
"""
import argparse
import copy
import gc
import inspect
import warnings

import torch

from harness import (environment, median, peak_memory_mb, peak_tflops, print_table, reset_peak_memory,
                    setup_device, time_steps, write_json, load_reference_lightningdit)
from models.lightningdit import LightningDiT, model_config
from models.checkpoint import PipelineInfo
from training.cli import training_options
from training.dit_module import DiTTrainingModule

warnings.filterwarnings("ignore", message=".*self.log.*")   # the module is stepped without a Trainer
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


#################################################################################
#                                  FLOPs                                        #
#################################################################################

def train_flops_per_latent(model: LightningDiT) -> dict[str, float]:
    """Analytic training FLOPs per latent (see the module docstring) and the naive 6 * params * T."""
    tokens = model.pos_embed.shape[1]
    blocks = list(model.blocks)
    width = model.pos_embed.shape[-1]
    per_token = sum(p.numel() for n, p in model.named_parameters()
                    if n.startswith(("x_embedder.", "final_layer.linear."))
                    or (n.startswith("blocks.") and ".adaLN_modulation." not in n))
    per_cond = sum(p.numel() for n, p in model.named_parameters()
                   if ".adaLN_modulation." in n or n.startswith("t_embedder."))
    attention = 12 * len(blocks) * tokens**2 * width
    all_params = sum(p.numel() for p in model.parameters())
    return {"flops": 6 * per_token * tokens + 6 * per_cond + attention,
            "flops_6NT": 6 * all_params * tokens + attention,
            "tokens": tokens, "params_token": per_token, "params_cond": per_cond, "params": all_params}


#################################################################################
#                                Training step                                  #
#################################################################################

def build_timed_module(name: str, args, device: torch.device) -> DiTTrainingModule:
    """A DiTTrainingModule on synthetic latents (what is timed does not depend on their values)."""
    config = model_config(f"LightningDiT-{name}", num_classes=args.num_classes,
                          use_checkpoint=args.grad_checkpointing or None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.num_latents, 32, 16, 16, generator=g)
    y = torch.randint(0, args.num_classes, (args.num_latents,), generator=g)
    info = PipelineInfo(model_config=config, users=[f"ID_{i + 1}" for i in range(args.num_classes)],
                        user_numbers=list(range(1, args.num_classes + 1)),
                        latent_mean=torch.zeros(1, 32, 1, 1), latent_std=torch.ones(1, 32, 1, 1))
    options = training_options(["--batch_size", str(args.batch_size), *(["--compile"] if args.compile else [])],
                               required=())
    module = DiTTrainingModule(info, x, y, x[:2], y[:2], options)
    # Away from the adaLN-Zero init (output exactly 0), so the ours-vs-reference check means something.
    for layer in [b.adaLN_modulation[-1] for b in module.model.blocks] + [module.model.final_layer.linear]:
        torch.nn.init.normal_(layer.weight, std=0.02)
    return module.to(device).train()


def swap_in_reference(module: DiTTrainingModule, reference_cls, device: torch.device) -> DiTTrainingModule:
    """The same module with the reference's model (same config, same weights) in place of ours."""
    # Our defaults (SwiGLU, RoPE, RMSNorm) are the published config; the reference defaults them off.
    ours = {k: v.default for k, v in inspect.signature(LightningDiT).parameters.items()}
    ref = reference_cls(**{**ours, **module.info.model_config})
    ref.load_state_dict(module.model.state_dict(), strict=True)
    module = copy.copy(module)   # shares latents and buffers; model, EMA and forward are replaced below
    module._modules = dict(module._modules)
    module.model = ref.to(device).train()
    module.ema = copy.deepcopy(module.model).requires_grad_(False).eval()
    module.__dict__["forward_fn"] = module.model   # as DiTTrainingModule does: not a submodule
    return module


def make_step(module: DiTTrainingModule, precision: str, device: torch.device):
    """A closure running one full training step of the module (see the module docstring)."""
    optimizer = module.configure_optimizers()
    dtype = AUTOCAST[precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = module.training_step(None, 0)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.update_ema(module.global_step + 1)   # what DiTTrainingModule.optimizer_step adds
    return step


def check_same_function(ours: DiTTrainingModule, ref: DiTTrainingModule, device: torch.device) -> float:
    """Max |ours - reference| of one eval forward with the shared weights (guards the comparison)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 16, 16, generator=g).to(device)
    t, y = torch.rand(2, generator=g).to(device), torch.tensor([0, 1], device=device)
    with torch.no_grad():
        a, b = ours.model.eval()(x, t, y), ref.model.eval()(x, t, y)
    ours.model.train(), ref.model.train()
    return float((a - b).abs().max())


#################################################################################
#                                   Runner                                      #
#################################################################################

def bench_size(name: str, args, device: torch.device, reference_cls, peak: float) -> dict:
    module = build_timed_module(name, args, device)
    flops = train_flops_per_latent(module.model)
    row = {"model": name, "params_M": flops["params"] / 1e6, "batch": args.batch_size, "precision": args.precision,
           "compile": args.compile, "grad_ckpt": args.grad_checkpointing, "device": device.type}
    runners = {"ours": make_step(module, args.precision, device)}
    ref_module = None
    if reference_cls is not None:
        ref_module = swap_in_reference(module, reference_cls, device)
        row["ref_max_abs_diff"] = check_same_function(module, ref_module, device)
        runners["reference"] = make_step(ref_module, args.precision, device)
    # Interleave ours and the reference in rounds: both see the same background load on shared CPUs.
    times: dict[str, list[float]] = {k: [] for k in runners}
    cpu: dict[str, list[float]] = {k: [] for k in runners}
    reset_peak_memory(device)
    for r in range(args.repeats):
        for key, fn in runners.items():
            times[key] += time_steps(fn, args.steps, args.warmup if r == 0 else 1, device, cpu[key])
            if key == "ours" and r == 0:
                row["peak_mem_MB"] = peak_memory_mb(device)
    step_s = median(times["ours"])
    row.update(step_ms=1e3 * step_s, latents_per_s=args.batch_size / step_s,
               tflops=flops["flops"] * args.batch_size / step_s / 1e12)
    row["mfu_pct"] = 100 * row["tflops"] / peak
    row["gflop_per_latent"] = flops["flops"] / 1e9
    row["gflop_per_latent_6NT"] = flops["flops_6NT"] / 1e9
    if ref_module is not None:
        ref_s = median(times["reference"])
        row.update(ref_step_ms=1e3 * ref_s, ref_latents_per_s=args.batch_size / ref_s, speedup=ref_s / step_s)
        # CPU-time speedup: what the comparison means on a shared machine (exact with --threads 1).
        row["speedup_cpu_time"] = median(cpu["reference"]) / median(cpu["ours"])
        row["cpu_ms"], row["ref_cpu_ms"] = 1e3 * median(cpu["ours"]), 1e3 * median(cpu["reference"])
        # Per-round speedups show how stable the comparison is under background load.
        per_round = [median(times["reference"][i:i + args.steps]) / median(times["ours"][i:i + args.steps])
                     for i in range(0, len(times["ours"]), args.steps)]
        row["speedup_rounds"] = [round(s, 3) for s in per_round]
    row["step_times_ms"] = [round(1e3 * t, 2) for t in times["ours"]]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=None, help="comma list, e.g. S/2,B/2 (default: S/2,S/1,B/2,B/1 on "
                        "CPU, B/1,L/1,XL/1 on GPU)")
    parser.add_argument("--batch_size", type=int, default=None, help="default 8 on CPU, 32 on GPU")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (ours and reference interleaved)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default=None, choices=list(AUTOCAST),
                        help="autocast dtype (default bf16 on GPU, fp16 where bf16 is missing; fp32 on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (no reference run)")
    parser.add_argument("--grad_checkpointing", action="store_true")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--num_latents", type=int, default=4650, help="size of the in-memory latent set")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--reference_dir", default=None,
                        help="directory with the reference lightningdit.py & co (CPU eager comparison)")
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args()

    device = setup_device(args.device, args.threads)
    on_gpu = device.type == "cuda"
    args.sizes = args.sizes or ("B/1,L/1,XL/1" if on_gpu else "S/2,S/1,B/2,B/1")
    args.batch_size = args.batch_size or (32 if on_gpu else 8)
    if args.precision is None:
        args.precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "fp32"
    reference_cls = None
    if args.compile or on_gpu:
        print("reference comparison: CPU eager only, skipped for this run")
    else:
        reference_cls = load_reference_lightningdit(args.reference_dir)
    peak, peak_source = peak_tflops(device, AUTOCAST[args.precision] or torch.float32)
    print(f"{environment(device)['device']}: peak {peak:.4g} TFLOP/s ({peak_source})")

    rows = []
    for name in args.sizes.split(","):
        batch = args.batch_size
        while True:
            try:
                rows.append(bench_size(name.strip(), args, device, reference_cls, peak))
                break
            except torch.OutOfMemoryError:
                gc.collect(), reset_peak_memory(device)
                if args.batch_size == 1:
                    rows.append({"model": name, "batch": 1, "error": "OOM"})
                    break
                args.batch_size //= 2
                print(f"{name}: out of memory, retrying with batch {args.batch_size}")
        args.batch_size = batch
        gc.collect()
        # Written after every size: a later size that times out or crashes keeps the earlier results.
        write_json(args.json_out, {"benchmark": "train", "env": environment(device), "peak_tflops": peak,
                                   "peak_source": peak_source, "args": vars(args), "results": rows})
        print_table(rows[-1:], ["model", "batch", "latents_per_s", "step_ms", "mfu_pct", "ref_latents_per_s",
                                "speedup", "speedup_cpu_time"])

    columns = ["model", "params_M", "batch", "precision", "compile", "grad_ckpt", "step_ms", "latents_per_s",
               "tflops", "mfu_pct", "peak_mem_MB"]
    if reference_cls is not None:
        columns += ["ref_latents_per_s", "speedup", "speedup_cpu_time", "ref_max_abs_diff"]
    print_table(rows, columns, title=f"training step ({device.type}, median of {args.steps * args.repeats} steps)")


if __name__ == "__main__":
    main()
