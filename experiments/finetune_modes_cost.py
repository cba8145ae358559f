"""Trainable parameters and time per training step of each --finetune mode, from the same --init_from file.

A step is a Lightning training step's work: DiTTrainingModule.training_step, backward, the module's
AdamW, its EMA update, zero_grad (CPU: process CPU time per step, one thread, median).

Example (after experiments/init_from_vs_scratch.sh, which also runs this with RUNS="init partial lora"):
    python experiments/finetune_modes_cost.py --latent_dir OUT/init/latent_features \
        --init_from OUT/pretrain/trained_models/checkpoints/best.ckpt --config configs/studies/demo_lr5e-4.yaml \
        --precision 32-true --json_out x.json
"""
import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))   # the timing harness (it adds the repo root)
from harness import environment, median, print_table, setup_device, time_steps, write_json  # noqa: E402
from training.init_from import initialise_from  # noqa: E402
from training.cli import training_options  # noqa: E402
from training.train_dit import build_module  # noqa: E402

warnings.filterwarnings("ignore", message=".*self.log.*")   # the module is stepped without a Trainer


def time_mode(stage2_argv: list[str], finetune: str, steps: int, device: torch.device) -> dict:
    args = training_options([*stage2_argv, "--finetune", finetune])
    module = build_module(args, log=lambda m: None)
    initialise_from(module, args.init_from, finetune, lambda m: None, args.lora_rank, args.lora_alpha)
    module.to(device)
    optimizer = module.configure_optimizers()
    counter = iter(range(10**9))

    def step():
        i = next(counter)
        loss = module.training_step(None, i)
        loss.backward()
        optimizer.step()
        module.update_ema(i + 1)
        optimizer.zero_grad(set_to_none=True)
    cpu_times: list[float] = []
    time_steps(step, steps, warmup=3, device=device, cpu_times=cpu_times)
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.ema.parameters())
    return {"finetune": finetune, "trainable_params": trainable, "total_params": total,
            "trainable_share": trainable / total, "ms_per_step_cpu": 1e3 * median(cpu_times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="full,partial,lora")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json_out", default=None)
    args, stage2_argv = parser.parse_known_args()
    device = setup_device(args.device, args.threads)
    stage2_argv += ["--output_dir", "unused"]
    rows = [time_mode(stage2_argv, mode, args.steps, device) for mode in args.modes.split(",")]
    print_table(rows, ["finetune", "trainable_params", "total_params", "trainable_share", "ms_per_step_cpu"],
                "per --finetune mode")
    write_json(args.json_out, {"environment": environment(device), "stage2_flags": stage2_argv, "rows": rows})


if __name__ == "__main__":
    main()
