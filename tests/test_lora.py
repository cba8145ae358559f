"""--finetune lora: what trains, frozen weights, the EMA, merged checkpoints for stage 3, resume, half base."""
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import stage2_train_dit
from common.errors import PipelineError
from generation.cli import GenerateOptions
from generation.generate import generate, load_generator
from helpers import TINY_CLASSIFIER_FLAGS, TINY_DIT_MODEL_FLAGS, make_module, make_tokenizer
from models.lightningdit import LightningDiT
from models.checkpoint import ema_state_dict, merge_lora_state
from training.callbacks import HalfPrecisionBase
from training.finetune import halve_base_weights, partial_trainable
from training.resume import check_same_lora
from training.init_from import CLASS_TABLE, initialise_from, load_pretrained

RANK = 4


def lora_module(latent_dir, path, *flags):
    module = make_module(latent_dir, *flags)
    initialise_from(module, path, "lora", lambda m: None, lora_rank=RANK, lora_alpha=8)
    return module


def inputs(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, 4, 4, generator=g), torch.rand(n, generator=g), torch.arange(n) % 3


def stage2(latent_dir, out, path, *extra):
    stage2_train_dit.main(["--latent_dir", str(latent_dir), "--output_dir", str(out), *TINY_DIT_MODEL_FLAGS,
                           *TINY_CLASSIFIER_FLAGS, "--precision", "32-true", "--accelerator", "cpu",
                           "--batch_size", "8",
                           "--checkpoint_every_n_steps", "2", "--val_every_n_epochs", "1000", "--init_from", str(path),
                           "--finetune", "lora", "--lora_rank", str(RANK), "--lora_alpha", "8", "--lr", "1e-2", *extra])


def test_lora_trains_adapters_and_conditioning_only(published, latent_dir):
    path, _, ema = published
    reference = LightningDiT(**make_module(latent_dir).info.model_config).eval()
    module = lora_module(latent_dir, path)
    reference.load_state_dict({**ema, CLASS_TABLE: module.model.state_dict()[f"{CLASS_TABLE}"]})
    names = {n for n, p in module.model.named_parameters() if p.requires_grad}
    adapters = {n for n in names if ".lora_" in n}
    # Adapters on qkv, proj, w12, w3 of the one block, each an A and a B.
    assert {n.split(".lora_")[0] for n in adapters} == {"blocks.0.attn.qkv", "blocks.0.attn.proj",
                                                        "blocks.0.mlp.w12", "blocks.0.mlp.w3"}
    assert len(adapters) == 8
    assert names - adapters == {n for n, _ in reference.named_parameters() if n != "pos_embed" and partial_trainable(n)}
    assert "blocks.0.attn.qkv.base_layer.weight" not in names and "blocks.0.norm1.weight" not in names
    opt = module.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for p in module.model.parameters() if p.requires_grad}
    # The EMA shares the frozen base (no second copy) and has its own trainable tensors.
    assert module.ema.blocks[0].attn.qkv.base_layer.weight is module.model.blocks[0].attn.qkv.base_layer.weight
    assert module.ema.final_layer.linear.weight is not module.model.final_layer.linear.weight
    # B starts at zero: before training the adapted model is the loaded one.
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.model(*inputs()), reference(*inputs()), rtol=0, atol=0)


def test_merge_equals_the_adapted_model_and_peft_merge(published, latent_dir):
    module = lora_module(latent_dir, published[0])
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    model = module.model.eval()
    merged = LightningDiT(**module.info.model_config).eval()
    merged.load_state_dict(merge_lora_state(model.state_dict(), module.info.lora))
    with torch.no_grad():
        torch.testing.assert_close(merged(*inputs()), model(*inputs()), rtol=1e-5, atol=1e-6)
        for layer in [m for m in model.modules() if hasattr(m, "lora_A")]:
            layer.merge()   # peft's own merge, in place into the base weight
    qkv = merged.state_dict()["blocks.0.attn.qkv.weight"]
    torch.testing.assert_close(qkv, model.blocks[0].attn.qkv.base_layer.weight, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_lora_stage2_keeps_base_frozen_and_stage3_needs_no_init_file(published, latent_dir, tmp_path, capsys):
    path, _, ema = published
    out = tmp_path / "run"
    stage2(latent_dir, out, path, "--max_steps", "4")
    assert "--finetune lora (rank 4): training" in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    assert ckpt["pipeline"]["lora"] == {"rank": RANK, "alpha": 8.0}
    for prefix in ("model.", "ema."):   # frozen base projections: bit-identical to the file
        for layer in ("attn.qkv", "attn.proj", "mlp.w12", "mlp.w3"):
            for leaf in ("weight", "bias"):
                key = f"blocks.0.{layer}.{leaf}"
                assert torch.equal(sd[f"{prefix}blocks.0.{layer}.base_layer.{leaf}"], ema[key]), prefix + key
        assert torch.equal(sd[f"{prefix}blocks.0.norm1.weight"], ema["blocks.0.norm1.weight"])
    assert sd["model.blocks.0.attn.qkv.lora_B.default.weight"].abs().max() > 0           # adapters trained
    assert not torch.equal(sd["model.blocks.0.adaLN_modulation.1.weight"], ema["blocks.0.adaLN_modulation.1.weight"])
    assert not torch.equal(sd["ema.blocks.0.mlp.w3.lora_B.default.weight"],              # the EMA follows them
                           sd["model.blocks.0.mlp.w3.lora_B.default.weight"])
    # Stage 3 from the checkpoint and a tokenizer only: the init file is gone.
    moved = tmp_path / "elsewhere.pt"
    shutil.move(path, moved)
    try:
        model, info = load_generator(str(out / "checkpoints" / "last.ckpt"), "cpu")
        assert not any(".lora_" in k or "base_layer" in k for k in model.state_dict())
        merged = ema_state_dict(ckpt)["blocks.0.attn.qkv.weight"]
        assert not torch.equal(merged, ema["blocks.0.attn.qkv.weight"])                  # adapters merged in
        again = load_pretrained(out / "checkpoints" / "last.ckpt")                       # and as --init_from
        assert set(again.state) == set(ema) and torch.equal(again.state["blocks.0.attn.qkv.weight"], merged)
        tok = make_tokenizer(tmp_path / "tok.safetensors")
        paths = generate(GenerateOptions.defaults(dit_checkpoint=str(out / "checkpoints" / "last.ckpt"),
                                                  vavae_path=str(tok), output_dir=str(tmp_path / "gen"),
                                                  user_ids=[1, 3], num_samples_per_user=1, num_steps=2, device="cpu"),
                         log=lambda m: None)
        assert [p.name for p in paths] == ["micro_doppler_user01_001.png", "micro_doppler_user03_001.png"]
    finally:
        shutil.move(moved, path)


class Crash(RuntimeError):
    pass


class CrashAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"killed at step {self.step}")


@pytest.mark.slow
def test_lora_resume_after_crash_is_exact(published, latent_dir, tmp_path, monkeypatch, capsys):
    path = published[0]
    stage2(latent_dir, tmp_path / "whole", path, "--max_steps", "6")
    # Same command, the process dies during step 5 (last.ckpt is from step 4), then is run again.
    real_trainer = pl.Trainer

    def crashing_trainer(*args, **kwargs):
        kwargs["callbacks"] = [*kwargs["callbacks"], CrashAt(5)]
        return real_trainer(*args, **kwargs)
    monkeypatch.setattr(pl, "Trainer", crashing_trainer)
    with pytest.raises(Crash):
        stage2(latent_dir, tmp_path / "run", path, "--max_steps", "6")
    monkeypatch.setattr(pl, "Trainer", real_trainer)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    capsys.readouterr()
    stage2(latent_dir, tmp_path / "run", path, "--max_steps", "6")
    assert "at step 4" in capsys.readouterr().out
    ref = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    got = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert got["global_step"] == ref["global_step"] == 6
    assert ref["state_dict"].keys() == got["state_dict"].keys()
    for key, value in ref["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    # Resuming with other adapters is named, not a key error.
    with pytest.raises(PipelineError, match="--lora_rank 4.*--lora_rank 8"):
        check_same_lora(ref["pipeline"]["lora"], {"rank": 8, "alpha": 8.0}, Path("last.ckpt"))


def test_lora_needs_init_from(latent_dir, tmp_path):
    with pytest.raises(PipelineError, match="--finetune lora.*--init_from"):
        stage2_train_dit.main.__wrapped__(["--latent_dir", str(latent_dir), "--output_dir", str(tmp_path),
                                           *TINY_DIT_MODEL_FLAGS, *TINY_CLASSIFIER_FLAGS, "--finetune", "lora",
                                           "--accelerator", "cpu"])


@pytest.mark.slow
def test_half_precision_base_trains_in_mixed_precision(published, latent_dir):
    """On a GPU the frozen base is stored in the autocast dtype (here bf16 on the CPU, the same path)."""
    module = lora_module(latent_dir, published[0])
    base = module.model.blocks[0].attn.qkv.base_layer.weight
    expected = base.detach().to(torch.bfloat16).clone()
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=2, logger=False,
                         enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[HalfPrecisionBase(device_types=("cpu",))])
    trainer.fit(module)
    for layer in (module.model.blocks[0].attn.qkv, module.model.blocks[0].mlp.w3):
        assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A.default.weight.dtype == torch.float32
    assert module.ema.blocks[0].attn.qkv.base_layer.weight is module.model.blocks[0].attn.qkv.base_layer.weight
    assert torch.equal(module.model.blocks[0].attn.qkv.base_layer.weight, expected)
    assert module.model.blocks[0].adaLN_modulation[1].weight.dtype == torch.float32
    assert halve_base_weights(module.model, torch.bfloat16) == 0   # already half: nothing more to save
