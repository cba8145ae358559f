"""Non-finite losses (training/divergence.py): a NaN stops the run with advice and keeps the last good checkpoint,
caught between checkpoints too; fp16 uses loss scaling."""
import pytest
import torch

from common.errors import PipelineError
from helpers import TINY_PRECISION, assert_user_error, load_ckpt, run_stage, stage2_args, train_in_process
from training.divergence import NONFINITE_CHECK_EVERY

S2 = "stage2_train_dit.py"


@pytest.mark.slow
def test_nonfinite_loss_stops_with_advice_and_keeps_good_checkpoint(tmp_path, latents):
    out = tmp_path / "nan"
    proc = run_stage(S2, *stage2_args(latents, out, "--max_steps", 30, "--checkpoint_every_n_steps", 1,
                                      "--lr", "1e30"))
    assert_user_error(proc, rf"NaN/inf by step 1 \(precision {TINY_PRECISION}, lr 1e\+30\)",
                      r"last good checkpoint, \S*last\.ckpt \(step 1\), is kept", r"lower --lr", r"--use_qknorm")
    ckpt = load_ckpt(out / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


@pytest.mark.parametrize("nan_step, every, max_steps", [(7, 5, 40), (23, 1000, 200)])
@pytest.mark.slow
def test_nonfinite_loss_is_caught_between_checkpoints(tmp_path, latents, monkeypatch, nan_step, every, max_steps):
    # With validation (and its last.ckpt) rare, only the periodic check of the device flag can stop the run.
    """NaN at a given step: the error names that step, the run stops soon (not only at checkpoint time)."""
    import training.dit_module as dm
    real, calls = dm.sample_timesteps, []

    def nan_from_step(n, *args, **kwargs):
        calls.append(n)
        t = real(n, *args, **kwargs)
        return t * float("nan") if len(calls) > nan_step else t

    monkeypatch.setattr(dm, "sample_timesteps", nan_from_step)
    out = tmp_path / "run"
    with pytest.raises(PipelineError, match=rf"NaN/inf by step {nan_step} \(precision {TINY_PRECISION}") as err:
        train_in_process(latents, out, "--log_every_n_steps", 1, "--max_steps", max_steps,
                         "--checkpoint_every_n_steps", every, "--val_every_n_epochs", 1 if every < nan_step else 1000)
    assert len(calls) <= max(nan_step + 1, 10) + NONFINITE_CHECK_EVERY
    if every < nan_step:
        ckpt = load_ckpt(out / "checkpoints" / "last.ckpt")   # the last one from before the NaN step is kept
        assert 0 < ckpt["global_step"] <= nan_step
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    else:
        assert not (out / "checkpoints" / "last.ckpt").exists()
        assert "No checkpoint was written before it" in str(err.value)   # none is claimed to be kept


def test_fp16_uses_loss_scaling(monkeypatch):
    from pytorch_lightning.plugins.precision import MixedPrecision
    from common.device import resolve_precision
    with pytest.warns(UserWarning):   # GradScaler disables itself without CUDA; on a GPU it scales
        plugin = MixedPrecision("16-mixed", "cuda")
    assert isinstance(plugin.scaler, torch.amp.GradScaler)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))   # a T4
    with pytest.warns(UserWarning, match="no native bf16"):
        assert resolve_precision("bf16-mixed", "cuda") == "16-mixed"
