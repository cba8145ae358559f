"""The configuration a GPU runs, run on the CPU: mixed precision (bf16 and fp16 with loss scaling), fused AdamW
and gradient clipping through the Lightning Trainer; real bf16 support (T4s have none); DDP keeping each
rank's NaN flag; CUDA out-of-memory as a user error; progress and logs readable outside a terminal."""
import csv
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import training.dit_module as dm
import training.resume as resume_mod
import training.train_dit as td
import common.device as device_mod
from common.device import bf16_supported, resolve_precision
from common.errors import PipelineError
from training.callbacks import AtomicCheckpointIO
from training.divergence import MAX_SKIPPED_IN_A_ROW, NonFiniteLoss
from helpers import (PYTHON, ROOT, assert_user_error, make_dataset, make_tokenizer, run_main, run_stage,
                     stage1_args, stage2_args, train_in_process, write_malicious)

CLIP = 0.01   # far below this tiny model's gradient norms: every step must be clipped


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_path")
    tokenizer = make_tokenizer(root / "tok.safetensors")
    proc = run_stage("stage1_extract_features.py",
                     *stage1_args(make_dataset(root / "data", per_user=4), tokenizer, root / "latents"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "latents"


def fp16_like_a_t4(monkeypatch) -> None:
    """Lightning turns 16-mixed on a CPU accelerator into bf16-mixed: hand the Trainer the fp16 plugin a GPU
    gets (autocast to fp16, a GradScaler scaling the loss) explicitly."""
    import pytorch_lightning as pl
    from pytorch_lightning.plugins.precision import MixedPrecision
    real_trainer = pl.Trainer

    def trainer(precision, plugins, **kwargs):
        assert precision == "16-mixed"
        return real_trainer(plugins=[*plugins, MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))],
                            **kwargs)

    monkeypatch.setattr(td, "resolve_precision", lambda precision, accelerator: precision)
    monkeypatch.setattr(pl, "Trainer", trainer)


#################################################################################
#                 Mixed precision + fused AdamW + clipping on the CPU           #
#################################################################################

@pytest.mark.slow
@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)])
def test_stage2_mixed_precision_with_clipping_and_fused_adamw(tmp_path, latents, monkeypatch, precision, dtype):
    """The GPU's configuration through the Trainer. Before the fix it failed at the first step
    ('AdamW does not allow for gradient clipping ... fused'), or, on the CPU, silently trained in fp32."""
    monkeypatch.setattr(device_mod, "bf16_supported", lambda device: True)   # bf16 runs on any CPU
    if precision == "16-mixed":   # the T4 path
        fp16_like_a_t4(monkeypatch)
    seen = {"autocast": set(), "fused": set(), "grad_norms": [], "scales": set()}
    real_loss, real_ema = dm.flow_matching_loss, dm.DiTTrainingModule.update_ema

    def recording_loss(*args, **kwargs):
        if torch.is_grad_enabled():   # training, not validation
            seen["autocast"].add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real_loss(*args, **kwargs)

    def recording_ema(self, step):   # right after each optimizer step: the gradients it used are still there
        optimizer = self.trainer.optimizers[0]
        seen["fused"].add(optimizer.defaults["fused"])
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        seen["grad_norms"].append(float(torch.stack([g.norm() for g in grads]).norm()))
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        seen["scales"].add(None if scaler is None else float(scaler.get_scale()))
        return real_ema(self, step)

    monkeypatch.setattr(dm, "flow_matching_loss", recording_loss)
    monkeypatch.setattr(dm.DiTTrainingModule, "update_ema", recording_ema)
    out = tmp_path / precision
    train_in_process(latents, out, "--precision", precision, "--grad_clip", CLIP, "--max_steps", 6)
    assert seen["autocast"] == {dtype}
    assert seen["fused"] == {True}
    assert len(seen["grad_norms"]) == 6 and all(0 < n <= CLIP * 1.001 for n in seen["grad_norms"])
    assert (None in seen["scales"]) == (precision == "bf16-mixed")   # fp16: a GradScaler scaled the loss
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_fp16_step_with_inf_gradients_is_skipped_not_applied(tmp_path, latents, monkeypatch):
    """Unscaling before the clip must keep GradScaler's inf check: an overflowed step changes no weight."""
    fp16_like_a_t4(monkeypatch)
    real_clip, weights = dm.DiTTrainingModule.configure_gradient_clipping, []

    def overflow_first_step(self, optimizer, *args, **kwargs):
        if self.global_step == 0:
            next(p for p in self.model.parameters() if p.grad is not None).grad[0] = float("inf")
            weights.append([p.detach().clone() for p in self.model.parameters()])
        return real_clip(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(dm.DiTTrainingModule, "configure_gradient_clipping", overflow_first_step)
    real_ema = dm.DiTTrainingModule.update_ema
    monkeypatch.setattr(dm.DiTTrainingModule, "update_ema", lambda self, step: (
        weights.append([p.detach().clone() for p in self.model.parameters()]), real_ema(self, step))[1])
    train_in_process(latents, tmp_path / "fp16", "--precision", "16-mixed", "--max_steps", 2)
    before, after_skipped, after_next = weights
    assert all(torch.equal(a, b) for a, b in zip(before, after_skipped))
    assert not all(torch.equal(a, b) for a, b in zip(after_skipped, after_next))


#################################################################################
#                              Precision choice                                 #
#################################################################################

def fake_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # what a T4 claims (emulation)


def test_bf16_means_native_support(monkeypatch):
    from models.sampling import sampling_dtype
    fake_gpu(monkeypatch, (7, 5))   # T4
    assert not bf16_supported("cuda") and sampling_dtype("cuda") == torch.float16
    with pytest.warns(UserWarning, match="no native bf16"):
        assert resolve_precision("bf16-mixed", "cuda") == "16-mixed"
    fake_gpu(monkeypatch, (8, 0))   # A100
    assert bf16_supported("cuda") and sampling_dtype("cuda:0") == torch.bfloat16
    assert resolve_precision("bf16-mixed", "cuda") == "bf16-mixed"
    assert resolve_precision("bf16-mixed", "cuda", loss_scaling=False) == "bf16-mixed"
    assert sampling_dtype("cpu") is None   # stage 3 on the CPU samples in fp32


@pytest.mark.parametrize("native, asked, expected", [
    (True, "bf16-mixed", "bf16-mixed"), (False, "bf16-mixed", "32-true"),
    (True, "16-mixed", "bf16-mixed"), (False, "16-mixed", "32-true"), (False, "32-true", "32-true")])
def test_cpu_precision(monkeypatch, recwarn, native, asked, expected):
    monkeypatch.setattr(device_mod, "bf16_supported", lambda device: native and device == "cpu")
    assert resolve_precision(asked, "cpu") == expected
    assert bool(recwarn.list) == (asked != expected)   # a fallback is never silent


def test_this_cpu_reports_its_bf16():
    flags = open("/proc/cpuinfo").read() if sys.platform == "linux" else ""
    if sys.platform == "linux":
        assert bf16_supported("cpu") == bool(re.search(r"\b(avx512_bf16|amx_tile)\b", flags))


#################################################################################
#                  DDP: each rank's NaN flag survives (no buffer broadcast)     #
#################################################################################

NAN_ON_RANK_1 = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import torch
    import training.dit_module as dm
    real, calls = dm.flow_matching_loss, []

    def loss(*args, **kwargs):   # the loss *value* of rank 1 at step 12 is NaN; the gradients stay finite
        value = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            if os.environ.get("LOCAL_RANK") == "1" and len(calls) == 13:
                value = value + value.detach() * float("nan")
        return value

    dm.flow_matching_loss = loss
    import stage2_train_dit
    stage2_train_dit.main(sys.argv[1:])
""")


@pytest.mark.slow
def test_ddp_nan_on_one_rank_stops_the_run(tmp_path, latents):
    """No check follows step 12 at once (the next is the checkpoint after step 15): before the fix DDP's buffer
    broadcast replaced rank 1's flag with rank 0's at step 13, and the run finished as if nothing had happened."""
    driver = tmp_path / "driver.py"
    driver.write_text(NAN_ON_RANK_1.format(root=str(ROOT)))
    proc = subprocess.run([PYTHON, driver, *stage2_args(latents, tmp_path / "ddp", "--devices", 2,
                                                        "--max_steps", 20, "--checkpoint_every_n_steps", 4,
                                                        "--val_every_n_epochs", 1000)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert_user_error(proc, r"NaN/inf by step 12 ")
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 12   # the last one before the NaN; none was written after it


def test_lightning_resume_reads_weights_only_on_any_version(tmp_path):
    """Trainer.fit(ckpt_path=...) loads through AtomicCheckpointIO: weights_only even when Lightning (< 2.6 has no
    fit(weights_only=...)) asks for a full unpickle."""
    marker = tmp_path / "pwned"
    evil = write_malicious(tmp_path / "last.ckpt", marker)
    with pytest.raises(PipelineError, match="refused"):
        AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)
    assert not marker.exists()


#################################################################################
#                       Out of GPU memory: advice, no traceback                 #
#################################################################################

def raise_oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_stage2_out_of_memory_names_the_flags(tmp_path, latents, monkeypatch, capsys):
    monkeypatch.setattr(dm.DiTTrainingModule, "training_step", raise_oom)
    result = run_main(capsys, "stage2_train_dit.py", *stage2_args(latents, tmp_path / "oom", "--max_steps", 2))
    assert_user_error(result, r"stage 2 ran out of GPU memory \(CUDA out of memory. Tried to allocate 2.00 GiB\)",
                      r"--batch_size", r"--grad_checkpointing", r"--model", r"kaggle_2xT4.yaml")


def test_stage3_out_of_memory_names_the_flags(tmp_path, monkeypatch, capsys):
    import generation.generate as gen
    monkeypatch.setattr(gen, "load_generator", raise_oom)
    result = run_main(capsys, "stage3_inference.py", "--dit_checkpoint", tmp_path / "x.ckpt", "--vavae_path",
                      tmp_path / "v", "--output_dir", tmp_path / "out", "--user_ids", 1, "--batch_size", 16)
    assert_user_error(result, r"stage 3 ran out of GPU memory", r"--batch_size \(now 16")
    assert not (tmp_path / "out").exists()


def test_other_errors_are_not_taken_for_out_of_memory():
    from common.errors import out_of_memory_advice
    with pytest.raises(RuntimeError, match="something else"), out_of_memory_advice("stage 2", "--batch_size"):
        raise RuntimeError("something else")
    with pytest.raises(PipelineError, match="--batch_size"), out_of_memory_advice("stage 2", "--batch_size"):
        raise_oom()


#################################################################################
#                          Logs outside a terminal                              #
#################################################################################

@pytest.mark.slow
def test_stage2_log_outside_a_terminal(tmp_path, latents):
    """Output to a pipe, as on Kaggle, in CI or under nohup: whole progress lines, no \\r or escape codes;
    resuming does not claim the history will be deleted, the EMA's eval mode raises no warning, and Lightning's
    adverts and defaults notes stay out."""
    out = tmp_path / "run"
    first = run_stage("stage2_train_dit.py", *stage2_args(latents, out, "--max_steps", 4))
    resumed = run_stage("stage2_train_dit.py", *stage2_args(latents, out, "--max_steps", 8))
    for proc in (first, resumed):
        assert proc.returncode == 0, proc.stderr[-3000:]
        text = proc.stdout + proc.stderr
        assert "\r" not in text and "\x1b" not in text
        assert "Previous log files" not in text and "in eval mode" not in text
        # Lightning's noise that says nothing to a stage 2 user (on the Lightning and torch versions that print it)
        for noise in ("litlogger", "smaller than the logging interval", "LeafSpec", "`weights_only` was not set"):
            assert noise not in text, noise
    steps = [int(s) for s in re.findall(r"^stage 2: step (\d+)/(?:\d+) \(\d+%\), epoch \d+, [\d.]+ steps/s",
                                        resumed.stderr, re.M)]
    assert steps[0] == 4 and steps[-1] == 8 and steps == sorted(steps)
    assert "train_loss_step=" in resumed.stderr


def test_line_progress_is_plain_and_occasional(capsys, monkeypatch):
    import common.progress as cp
    monkeypatch.setattr(cp, "is_terminal", lambda: False)
    for _ in cp.progress_bar(range(1000), desc="stage 3 sampling", unit="batch"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 11   # the start, each further tenth (the last one is the end)
    assert lines[-1].startswith("stage 3 sampling: 1000/1000 batch (100%)")
    assert not any("\r" in line or "\x1b" in line for line in lines)


@pytest.mark.slow
def test_stage_headers_come_before_the_stage_output(tmp_path):
    data = make_dataset(tmp_path / "data", per_user=3)
    tokenizer = make_tokenizer(tmp_path / "tok.safetensors")
    command = [PYTHON, "run_complete_pipeline.py", "--data_dir", data, "--vavae_path", tokenizer,
               "--output_dir", tmp_path / "out", "--stages", 1, "--image_size", 64, "--num_workers", 0]
    proc = subprocess.run(list(map(str, command)),
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    header, done = proc.stdout.index("== stage 1:"), proc.stdout.index("stage 1 done")
    assert header < done and "\r" not in proc.stdout


@pytest.mark.slow
def test_lr_warmup_ramps_then_holds_and_resumes(tmp_path, latents, monkeypatch):
    """--warmup_steps: the lr of step s is lr * min(1, (s + 1) / warmup), also after a resume (no scheduler state)."""
    seen = []
    real_ema = dm.DiTTrainingModule.update_ema

    def recording_ema(self, step):
        seen.append((step, self.trainer.optimizers[0].param_groups[0]["lr"]))
        return real_ema(self, step)

    monkeypatch.setattr(dm.DiTTrainingModule, "update_ema", recording_ema)
    out = tmp_path / "warm"
    train_in_process(latents, out, "--lr", 1e-3, "--warmup_steps", 4, "--max_steps", 3)
    train_in_process(latents, out, "--lr", 1e-3, "--warmup_steps", 4, "--max_steps", 6)   # resumes
    assert {step for step, _ in seen} == set(range(1, 7))
    for step, lr in seen:
        assert lr == pytest.approx(1e-3 * min(1.0, step / 4))


#################################################################################
#          Non-finite steps: skipped under loss scaling, advice per device      #
#################################################################################

def nan_loss_at(monkeypatch, steps) -> None:
    """The training loss (and so every gradient) is NaN at these steps, as an fp16 overflow makes it."""
    real = dm.flow_matching_loss

    def loss(module_or_fn, *args, **kwargs):
        value = real(module_or_fn, *args, **kwargs)
        return value * float("nan") if torch.is_grad_enabled() and current_step[0] in steps else value

    current_step = [0]
    real_step = dm.DiTTrainingModule.training_step

    def training_step(self, batch, batch_idx):
        current_step[0] = self.global_step
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(dm, "flow_matching_loss", loss)
    monkeypatch.setattr(dm.DiTTrainingModule, "training_step", training_step)


@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_fp16_overflow_is_skipped_counted_and_logged(tmp_path, latents, monkeypatch):
    """As AMP does: a step with a NaN loss is skipped, the scale halved and training goes on. Before the fix the
    run stopped at the first one."""
    fp16_like_a_t4(monkeypatch)
    nan_loss_at(monkeypatch, {2})
    out = tmp_path / "fp16"
    train_in_process(latents, out, "--precision", "16-mixed", "--max_steps", 6, "--checkpoint_every_n_steps", 3,
                     "--log_every_n_steps", 1)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    with open(out / "lightning_logs" / "csv" / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["skipped_steps"]) for r in csv.DictReader(f) if r.get("skipped_steps")}
    assert logged[1] == 0 and logged[max(logged)] == 1 and min(s for s, n in logged.items() if n == 1) == 2


@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_fp16_persistent_nan_stops_with_advice_for_a_t4(tmp_path, latents, monkeypatch):
    """NaN from step 3 on: skipped until MAX_SKIPPED_IN_A_ROW in a row (step 22), stopped at the next check
    (the checkpoint of step 25, which is not written); the kept checkpoint is named with its step, and the advice
    fits a device without native bf16 (no bf16-mixed, which it would turn back into 16-mixed)."""
    fp16_like_a_t4(monkeypatch)
    monkeypatch.setattr(resume_mod, "bf16_supported", lambda device: False)
    nan_loss_at(monkeypatch, set(range(3, 1000)))
    out = tmp_path / "fp16"
    with pytest.raises(PipelineError) as err:
        train_in_process(latents, out, "--precision", "16-mixed", "--max_steps", 60, "--checkpoint_every_n_steps", 5,
                         "--val_every_n_epochs", 1000)
    message = str(err.value)
    assert re.search(rf"stayed NaN/inf for {MAX_SKIPPED_IN_A_ROW} steps in a row up to step 22 "
                     r"\(precision 16-mixed, .* 22 skipped in all", message), message
    assert re.search(r"last good checkpoint, \S*last\.ckpt \(step 20\), is kept", message), message
    assert "--precision 32-true" in message and "bf16-mixed" not in message and "--use_qknorm" in message
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def divergence_args(tmp_path, *flags):
    from training.cli import training_options
    return training_options(["--latent_dir", str(tmp_path), "--output_dir", str(tmp_path), "--accelerator", "gpu",
                             *flags])


@pytest.mark.parametrize("capability, init_from, expected, absent", [
    ((7, 5), False, ["--precision 32-true", "--use_qknorm"], ["bf16-mixed"]),                 # T4
    ((7, 5), True, ["--precision 32-true"], ["bf16-mixed", "--use_qknorm"]),                  # T4, published weights
    ((8, 0), False, ["--precision bf16-mixed", "--use_qknorm"], ["32-true"]),           # A100
])
def test_divergence_advice_fits_the_device_and_the_weights(tmp_path, monkeypatch, capability, init_from,
                                                            expected, absent):
    fake_gpu(monkeypatch, capability)
    args = divergence_args(tmp_path, *(["--init_from", str(tmp_path / "published.pt")] if init_from else []))
    message = resume_mod.divergence_message(NonFiniteLoss(30, "skipped", 25), args, "16-mixed",
                                            tmp_path / "checkpoints")
    assert all(flag in message for flag in expected) and not any(flag in message for flag in absent), message
    assert "No checkpoint was written before it" in message and "is kept" not in message
    assert "--grad_clip" not in message   # already 1.0 by default


def test_divergence_message_names_the_checkpoint_kept(tmp_path):
    from common.io import save_torch
    from models.checkpoint import CHECKPOINT_KIND
    save_torch({"global_step": 40, "pipeline": {"kind": CHECKPOINT_KIND}}, tmp_path / "checkpoints" / "last.ckpt")
    message = resume_mod.divergence_message(NonFiniteLoss(45), divergence_args(tmp_path, "--grad_clip", "0"),
                                            "32-true", tmp_path / "checkpoints")
    assert f"last good checkpoint, {tmp_path / 'checkpoints' / 'last.ckpt'} (step 40), is kept" in message
    assert "--grad_clip 1.0" in message and "--precision" not in message   # nothing below fp32
