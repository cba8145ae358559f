"""The units stage 2's training step is made of, each on its own: the batches as a function of (seed, step, rank),
the EMA, AdamW's groups and warm-up, REPA's term, and the divergence guard's accounting of skipped fp16 steps."""
from types import SimpleNamespace

import pytest
import torch

from common.errors import PipelineError
from helpers import make_module
from training.batches import TrainBatches, steps_per_epoch, validation_batches
from training.divergence import DivergenceGuard, NonFiniteLoss
from training.ema import EMASchedule, update_ema
from training.optim import param_groups, warm_up
from training.repa import RepaAlignment


#################################################################################
#                                   Batches                                     #
#################################################################################

@pytest.mark.parametrize("world", [1, 2, 3])
def test_an_epoch_gives_each_latent_to_at_most_one_rank_and_step(world):
    n, batch = 25, 4
    batches = TrainBatches(n, batch, seed=5)
    spe = steps_per_epoch(n, batch, world)
    for epoch in range(2):
        seen = torch.cat([batches.indices(epoch * spe + s, r, world, torch.device("cpu"))
                          for s in range(spe) for r in range(world)])
        assert len(seen) == spe * world * batch and len(set(seen.tolist())) == len(seen)   # no latent twice


def test_a_batch_is_a_function_of_seed_step_and_rank():
    """A fresh sampler (a resumed run) gives the same batch at a step, mid-epoch, as one that walked there."""
    walked = TrainBatches(30, 4, seed=1)
    for step in range(11):
        expected = walked.indices(step, 1, 2, torch.device("cpu"))
    assert torch.equal(TrainBatches(30, 4, seed=1).indices(10, 1, 2, torch.device("cpu")), expected)
    assert not torch.equal(TrainBatches(30, 4, seed=2).indices(10, 1, 2, torch.device("cpu")), expected)
    assert not torch.equal(walked.indices(10, 0, 2, torch.device("cpu")), expected)


@pytest.mark.parametrize("num_val, batch, world", [(6, 4, 1), (7, 2, 2), (5, 4, 3), (2, 4, 3)])
def test_validation_shards_cover_every_latent_once(num_val, batch, world):
    slices = [s for rank in range(world) for s in validation_batches(num_val, batch, rank, world)]
    covered = [i for start, end in slices for i in range(start, end)]
    assert sorted(covered) == list(range(num_val)) and all(end - start <= batch for start, end in slices)


#################################################################################
#                                     EMA                                       #
#################################################################################

def test_update_ema_is_dits_average_of_the_trained_weights():
    model, ema_model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)   # frozen: its EMA is left alone
    before = {k: v.clone() for k, v in ema_model.state_dict().items()}
    update_ema(ema_model, model, 0.9)
    torch.testing.assert_close(ema_model.weight, 0.9 * before["weight"] + 0.1 * model.weight)
    assert torch.equal(ema_model.bias, before["bias"])


def test_ema_schedules():
    constant = EMASchedule.from_flags(0.99, None)
    assert constant(1) == pytest.approx(2 / 11) and constant(10 ** 6) == 0.99 and constant.gamma is None
    power = EMASchedule.from_flags(0.99, 0.1)   # EDM2's power function: --ema_decay no longer matters
    assert power(1) == 0.0 and power(100) == pytest.approx(0.99 ** (power.gamma + 1))


#################################################################################
#                             AdamW groups, warm-up                             #
#################################################################################

def test_parameter_groups_keep_norms_and_the_class_table_out_of_weight_decay(latent_dir):
    module = make_module(latent_dir)
    names = {id(p): n for n, p in module.model.named_parameters()}
    groups = param_groups(module.model, 1e-3, 0.01, 0.5, extra=torch.nn.Linear(2, 2))
    decayed = {names[id(p)] for g in groups[:-1] if "weight_decay" not in g for p in g["params"]}
    assert decayed and all(module.model.get_parameter(n).ndim >= 2 for n in decayed)
    assert not any("y_embedder" in n for n in decayed)
    backbone = [g for g in groups[:-1] if names[id(g["params"][0])].startswith("blocks.")
                and "adaLN" not in names[id(g["params"][0])]]
    assert backbone and all(g["lr"] == 0.5e-3 for g in backbone)
    assert groups[-1]["lr"] == 1e-3 and len(groups[-1]["params"]) == 2   # the extra (REPA projector) group last
    trainable = [p for p in module.model.parameters() if p.requires_grad]   # the fixed position table is not
    assert sum(len(g["params"]) for g in groups[:-1]) == len(trainable) < len(names)


def test_warm_up_ramps_each_group_from_its_base_lr():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.5}], lr=1.0)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    for step, ramp in ((0, 0.25), (2, 0.75), (3, 1.0), (50, 1.0)):
        warm_up(optimizer, step, warmup_steps=4, lr=1.0)
        assert [g["lr"] for g in optimizer.param_groups] == [ramp, 0.5 * ramp]


#################################################################################
#                                     REPA                                      #
#################################################################################

def test_repa_term_stops_at_haste_step_and_keeps_the_checkpoint_keys():
    targets = torch.randn(6, 16, 8)
    repa = RepaAlignment(hidden_size=32, num_blocks=3, targets=targets, weight=0.5, stop_step=10)
    assert repa.depth == 1 and (repa.weight_at(9), repa.weight_at(10)) == (0.5, 0.0)
    # The projector's weights under the keys checkpoints have always used; the targets stay out of them.
    assert sorted(repa.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    assert repa.targets.dtype == torch.float16
    with pytest.raises(PipelineError, match=r"--repa_depth 4 is not a block of this 3-block model"):
        RepaAlignment(hidden_size=32, num_blocks=3, targets=targets, weight=0.5, depth=4)


#################################################################################
#                         Divergence guard (fp16 skips)                         #
#################################################################################

def fake_trainer(scaler: torch.amp.GradScaler, step: int) -> SimpleNamespace:
    return SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), global_step=step,
                           strategy=SimpleNamespace(reduce=lambda tensor, reduce_op: tensor))


def test_a_skipped_step_is_counted_in_a_checkpoint_written_before_the_guards_batch_end():
    """The checkpoint callbacks may save before DivergenceGuard's on_train_batch_end: the skip of that very step
    is in the checkpoint all the same, and counted once."""
    module = SimpleNamespace(model=torch.nn.Linear(2, 2), ema=torch.nn.Linear(2, 2), device=torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))
    guard = DivergenceGuard()
    guard.on_load_checkpoint(None, module, {"skipped_steps": 3})   # a resumed run's count goes on
    guard.on_train_start(None, module)
    guard.on_before_optimizer_step(fake_trainer(scaler, 7), module, None)
    scaler.update(new_scale=scaler.get_scale() / 2)   # what GradScaler does when it skips the step
    checkpoint = {}
    guard.on_save_checkpoint(fake_trainer(scaler, 8), module, checkpoint)
    assert checkpoint["skipped_steps"] == 4
    guard.count_skipped_step(fake_trainer(scaler, 8))   # the guard's own batch end: nothing left to count
    assert int(guard.flags["skipped"]) == 4 and int(guard.flags["skipped_in_a_row"]) == 1
    with torch.no_grad():
        module.ema.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match="weights or their EMA hold NaN/inf values at step 8"):
        guard.check(fake_trainer(scaler, 8), module)
