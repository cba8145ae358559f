"""--init_from: start stage 2 from published-layout LightningDiT weights (tiny model, tiny latents)."""
import pytest
import torch

import stage2_train_dit
from common.errors import PipelineError
from common.io import save_safetensors
from helpers import TINY_CLASSIFIER_FLAGS, TINY_DIT_MODEL_FLAGS, USERS, make_module, tiny_dit, write_malicious
from training.finetune import partial_trainable
from training.init_from import CLASS_TABLE, initialise_from, load_pretrained, resize_class_table, suggest_flags


def test_reads_published_layout_and_prefers_ema(published):
    path, model, ema = published
    weights = load_pretrained(path)
    assert weights.picked == "ema"
    assert set(weights.state) == set(ema)
    for k in ema:
        torch.testing.assert_close(weights.state[k], ema[k], rtol=0, atol=0)
    assert weights.config["model"]["model_type"] == "LightningDiT-S/2"


def test_reads_other_layouts(tmp_path, published):
    _, model, ema = published
    # Only `model`, DDP-prefixed: the prefix is stripped.
    torch.save({"model": {f"module.{k}": v for k, v in model.items()}}, tmp_path / "model_only.pt")
    got = load_pretrained(tmp_path / "model_only.pt").state
    assert set(got) == set(model) and torch.equal(got[CLASS_TABLE], model[CLASS_TABLE])
    torch.save(ema, tmp_path / "flat.pt")
    torch.save({"state_dict": ema}, tmp_path / "nested.pt")
    save_safetensors(ema, tmp_path / "flat.safetensors")
    save_safetensors({f"state_dict.{k}": v for k, v in ema.items()}, tmp_path / "prefixed.safetensors")
    for name in ("flat.pt", "nested.pt", "flat.safetensors", "prefixed.safetensors"):
        got = load_pretrained(tmp_path / name).state
        assert set(got) == set(ema), name
        assert all(torch.equal(got[k], ema[k]) for k in ema), name


@pytest.mark.parametrize("wrap", ["model._orig_mod.{}", "ema._orig_mod.{}", "state_dict.ema.module._orig_mod.{}",
                                  "_orig_mod.module.{}"])
def test_wrapper_segments_are_stripped_at_any_depth(tmp_path, published, wrap):
    """A Lightning module whose DiT was torch.compile'd saves `model._orig_mod.*`: the segment sits under
    `model.`/`ema.`, not at the front of the key, and was missed ("holds no LightningDiT weights")."""
    _, _, ema = published
    save = save_safetensors if wrap.startswith("state_dict.") else torch.save
    path = tmp_path / ("w.safetensors" if save is save_safetensors else "w.pt")
    save({wrap.format(k): v for k, v in ema.items()}, path)
    got = load_pretrained(path).state
    assert set(got) == set(ema)
    assert all(torch.equal(got[k], ema[k]) for k in ema)


def test_not_a_dit_is_a_clear_error(tmp_path):
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(2)}}, tmp_path / "vae.pt")
    with pytest.raises(PipelineError, match="no LightningDiT weights.*VA-VAE"):
        load_pretrained(tmp_path / "vae.pt").state
    with pytest.raises(PipelineError, match="not found"):
        load_pretrained(tmp_path / "missing.pt").state


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = write_malicious(tmp_path / "evil.pt", marker, key="ema", weight="x_embedder.proj.weight")
    with pytest.raises(PipelineError, match="refused"):
        load_pretrained(evil).state
    assert not marker.exists()


def test_initialise_resizes_table_keeps_everything_else(published, latent_dir):
    path, _, ema = published
    module = make_module(latent_dir)
    logs = []
    initialise_from(module, path, "full", logs.append)
    state = module.model.state_dict()
    table = state[CLASS_TABLE]
    assert table.shape == (len(USERS) + 1, 32)
    torch.testing.assert_close(table[-1], ema[CLASS_TABLE][-1], rtol=0, atol=0)      # the published null row
    published_rows = ema[CLASS_TABLE][:-1]
    mean, std = published_rows.mean(0), published_rows.std()
    assert (table[:-1] - mean).abs().max() < 0.5 * std                              # near the mean class
    assert (table[:-1] - mean).abs().max() > 0                                      # ... with a little noise
    assert not torch.equal(table[0], table[1])
    for k, v in ema.items():
        if k != CLASS_TABLE:
            torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    for k, v in module.ema.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)
    assert all(p.requires_grad for n, p in module.model.named_parameters() if n != "pos_embed")
    assert any("initialised from" in m and "10+1 -> 3+1" in m for m in logs)


def test_wrong_model_is_a_clear_error(published, latent_dir):
    path = published[0]
    module = make_module(latent_dir, "--hidden_size", "64", "--depth", "2")
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    with pytest.raises(PipelineError) as err:
        initialise_from(module, path, "full", lambda m: None)
    msg = str(err.value)
    assert "x_embedder.proj.weight: file (32, 32, 2, 2) vs model (64, 32, 2, 2)" in msg
    assert "--model LightningDiT-S/2 --depth 1 --hidden_size 32 --num_heads 2" in msg
    assert "its config says LightningDiT-S/2" in msg
    assert all(torch.equal(v, before[k]) for k, v in module.model.state_dict().items())   # untouched


def test_patch_and_qknorm_mismatch_hints(tmp_path, latent_dir):
    torch.save({"ema": tiny_dit(patch_size=1, use_qknorm=True).state_dict()}, tmp_path / "p1.pt")
    with pytest.raises(PipelineError, match=r"patch 1: pass --model LightningDiT-S/1 .*--use_qknorm"):
        initialise_from(make_module(latent_dir), tmp_path / "p1.pt", "full", lambda m: None)


def test_other_input_size_recomputes_grid_tables(tmp_path, latent_dir):
    torch.save({"ema": tiny_dit(input_size=8).state_dict()}, tmp_path / "grid4.pt")
    module = make_module(latent_dir)
    fresh_pos = module.model.pos_embed.detach().clone()
    logs = []
    initialise_from(module, tmp_path / "grid4.pt", "full", logs.append)
    assert torch.equal(module.model.pos_embed, fresh_pos)
    assert any("4x4 token grid" in m and "2x2" in m for m in logs)


def test_partial_freezes_exactly_blocks_and_optimizer_gets_trainable_only(published, latent_dir):
    module = make_module(latent_dir, "--backbone_lr_scale", "0.1")
    initialise_from(module, published[0], "partial", lambda m: None)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in module.model.named_parameters()
                if n != "pos_embed" and (not n.startswith("blocks.") or ".adaLN_modulation." in n)}
    assert trainable == expected
    assert "blocks.0.adaLN_modulation.1.weight" in trainable and "final_layer.linear.weight" in trainable
    assert {"t_embedder.mlp.0.weight", CLASS_TABLE, "x_embedder.proj.weight"} <= trainable
    assert "blocks.0.attn.qkv.weight" not in trainable and "blocks.0.norm1.weight" not in trainable
    opt = module.configure_optimizers()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in module.model.parameters() if p.requires_grad}
    # Full fine-tuning with a backbone scale: the blocks get their own, lower lr.
    module = make_module(latent_dir, "--backbone_lr_scale", "0.1")
    initialise_from(module, published[0], "full", lambda m: None)
    lrs = sorted(g["lr"] for g in module.configure_optimizers().param_groups)
    assert lrs == pytest.approx([1e-5, 1e-4])


def test_partial_trainable_names():
    assert partial_trainable("blocks.3.adaLN_modulation.1.bias")
    assert partial_trainable("final_layer.norm_final.weight")
    assert not partial_trainable("blocks.3.mlp.w12.weight")


def test_resize_class_table_keeps_rows_and_null():
    table = torch.randn(6, 8)
    new = resize_class_table(table, 3, keep={1: 4})
    assert new.shape == (4, 8)
    assert torch.equal(new[-1], table[-1]) and torch.equal(new[1], table[4])


def test_suggest_flags_for_named_sizes():
    assert suggest_flags(dict(depth=28, hidden_size=1152, num_heads=16, patch_size=1)) == "--model LightningDiT-XL/1"
    assert suggest_flags(dict(depth=12, hidden_size=768, patch_size=2)) == "--model LightningDiT-B/2"


@pytest.mark.slow
def test_stage2_end_to_end_with_init_from(published, latent_dir, tmp_path, capsys):
    path, _, ema = published
    out = tmp_path / "run"
    stage2_train_dit.main(["--latent_dir", str(latent_dir), "--output_dir", str(out), *TINY_DIT_MODEL_FLAGS,
                           *TINY_CLASSIFIER_FLAGS, "--precision", "32-true", "--accelerator", "cpu", "--max_steps", "4",
                           "--batch_size", "8", "--checkpoint_every_n_steps", "2", "--init_from", str(path),
                           "--finetune", "partial"])
    assert "initialised from" in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    assert sd[f"model.{CLASS_TABLE}"].shape == (4, 32)
    # Frozen blocks are exactly the published EMA weights; trained layers moved.
    assert torch.equal(sd["model.blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])
    assert torch.equal(sd["ema.blocks.0.mlp.w3.weight"], ema["blocks.0.mlp.w3.weight"])
    assert not torch.equal(sd["model.final_layer.linear.weight"], ema["final_layer.linear.weight"])
    # A stage 2 checkpoint is itself a valid --init_from: EMA picked, same users keep their rows.
    weights = load_pretrained(out / "checkpoints" / "last.ckpt")
    assert weights.picked == "state_dict/ema.*" and weights.users == USERS
    module = make_module(latent_dir)
    initialise_from(module, out / "checkpoints" / "last.ckpt", "full", lambda m: None)
    torch.testing.assert_close(module.model.state_dict()[CLASS_TABLE], sd[f"ema.{CLASS_TABLE}"], rtol=0, atol=0)


def test_weight_decay_spares_norms_biases_and_the_class_table(latent_dir):
    module = make_module(latent_dir, "--weight_decay", "0.05", "--use_qknorm", "--backbone_lr_scale", "0.5")
    groups = module.configure_optimizers().param_groups
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert decay.keys() == {id(p) for p in params.values()}
    for name, p in params.items():
        assert decay[id(p)] == (0.0 if p.ndim < 2 or name == CLASS_TABLE else 0.05), name
    assert decay[id(params["blocks.0.attn.q_norm.weight"])] == decay[id(params["blocks.0.attn.qkv.bias"])] == 0.0
    assert decay[id(params[CLASS_TABLE])] == 0.0 and decay[id(params["blocks.0.attn.qkv.weight"])] == 0.05
    # The backbone lr scale still applies within both kinds of group.
    assert lr[id(params["blocks.0.attn.qkv.weight"])] == lr[id(params["blocks.0.attn.qkv.bias"])] == 0.5e-4
    assert lr[id(params[CLASS_TABLE])] == 1e-4
    # Without weight decay the groups stay as before, head then blocks (an earlier run's optimizer state loads).
    plain = make_module(latent_dir)
    names = {id(p): n for n, p in plain.model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in plain.configure_optimizers().param_groups]
    assert len(groups) == 2 and groups[1] == [n for n in names.values()
                                              if n.startswith("blocks.") and "adaLN" not in n]
