"""The GRPO stage: its maths against hand-computed values, and the module through the real CLI and configs.

On the tiny random model the TAG rewards are 0 for every sample (its text is gibberish), so the
module tests add a reward through the documented extension point (`REWARDS`): completion length,
which varies between samples and so gives the policy a gradient.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import completion_length, newest_last_checkpoint, run_python, trained_weights
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tag_lightning.commands.cli import main
from tag_lightning.grounding.claims import read_completion
from tag_lightning.grounding.rewards import REWARDS
from tag_lightning.models.grpo import group_advantages, policy_loss, shuffled_within_groups

# -- advantages --------------------------------------------------------------------------------

REWARDS_2x4 = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 1.0])
CENTRED = [-1.5, -0.5, 0.5, 1.5, -0.25, -0.25, -0.25, 0.75]  # minus each group's mean (2.5 and 0.25)
GROUP_STD = [math.sqrt(5 / 3)] * 4 + [0.5] * 4  # Bessel: sqrt((2.25+0.25+0.25+2.25)/3), sqrt(0.75/3)
BATCH_STD = math.sqrt(sum((r - 11 / 8) ** 2 for r in REWARDS_2x4.tolist()) / 7)


@pytest.mark.parametrize("scale, expected", [
    ("group", [c / (s + 1e-4) for c, s in zip(CENTRED, GROUP_STD)]),
    ("batch", [c / (BATCH_STD + 1e-4) for c in CENTRED]),
    ("none", CENTRED),
])
def test_group_advantages(scale, expected):
    assert group_advantages(REWARDS_2x4, 4, scale).tolist() == pytest.approx(expected, abs=1e-6)


def test_a_group_of_one_is_refused():
    with pytest.raises(ValueError, match="a group of 1 has no advantage"):
        group_advantages(torch.tensor([0.5, 1.0]), 1)


def test_a_group_of_equal_rewards_has_no_advantage():
    assert group_advantages(torch.tensor([0.5, 0.5, 1.0, 0.0]), 2, "group").tolist() == pytest.approx(
        [0.0, 0.0, 0.5 / (math.sqrt(0.5) + 1e-4), -0.5 / (math.sqrt(0.5) + 1e-4)])  # std of (1, 0): sqrt(0.5)


# -- the loss ----------------------------------------------------------------------------------
# Two completions of 3 tokens, the last token of the second masked; ratios exp(logp - old):
# row 0 (A = +1): 1, e^0.5 (clipped to 1.2), 1;  row 1 (A = -2): 1, e^-0.2, e^0.4 (masked).
LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
OLD = torch.tensor([[-1.0, -2.5, -0.5], [-0.3, -1.0, -0.4]])
REF = torch.tensor([[-1.0, -2.0, -1.0], [-0.3, -1.2, 0.0]])  # differs from LOGPS on one token: -0.5
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADVANTAGES = torch.tensor([1.0, -2.0])
ROW0 = [-1.0, -1.2, -1.0]  # -min(ρA, clip(ρ)A) with A = 1: the clipped 1.2 is the smaller
ROW1 = [2.0, 2 * math.exp(-0.2)]  # with A = -2: -min(-2ρ, -2clip(ρ)) = 2ρ (ρ = e^-0.2 is inside the range)
KL = math.exp(-0.5) + 0.5 - 1  # k3 on row 0's last token: exp(d) - d - 1, d = ref - logp = -0.5


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", (sum(ROW0) / 3 + sum(ROW1) / 2) / 2),
    ("bnpo", (sum(ROW0) + sum(ROW1)) / 5),
    ("dr_grpo", (sum(ROW0) + sum(ROW1)) / (2 * 4)),
    ("dapo", (sum(ROW0) + sum(ROW1)) / 10),
])
def test_policy_loss_aggregations(loss_type, expected):
    loss, stats = policy_loss(LOGPS, OLD, ADVANTAGES, MASK, loss_type=loss_type, max_completion_length=4,
                              num_items_in_batch=10)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert stats == {"kl": 0.0, "clip_ratio": pytest.approx(1 / 5)}  # row 0's second token, clipped upwards


def test_policy_loss_with_the_k3_kl_and_asymmetric_clipping():
    loss, stats = policy_loss(LOGPS, OLD, ADVANTAGES, MASK, ref_logps=REF, beta=0.1, loss_type="grpo")
    assert float(loss) == pytest.approx(((sum(ROW0) + 0.1 * KL) / 3 + sum(ROW1) / 2) / 2, abs=1e-6)
    assert stats["kl"] == pytest.approx(KL / 5)
    loose, stats = policy_loss(LOGPS, OLD, ADVANTAGES, MASK, epsilon_low=0.1, epsilon_high=0.7, loss_type="bnpo")
    # row 0: e^0.5 < 1.7 is no longer clipped; row 1: e^-0.2 < 0.9 with A < 0 is: -min(-2ρ, -2·0.9) = 1.8
    assert float(loose) == pytest.approx((-1.0 - math.exp(0.5) - 1.0 + 2.0 + 1.8) / 5, abs=1e-6)
    assert stats["clip_ratio"] == pytest.approx(1 / 5)


def test_the_loss_gradient_is_the_policy_gradient_at_ratio_one():
    """With old = logps (the first of μ iterations) the gradient is -A/|o| per token under grpo."""
    logps = LOGPS.clone().requires_grad_(True)
    loss, _ = policy_loss(logps, LOGPS.detach(), ADVANTAGES, MASK, loss_type="grpo")
    loss.backward()
    expected = torch.tensor([[-1 / 3] * 3, [2 / 2, 2 / 2, 0.0]]) / 2
    assert torch.allclose(logps.grad, expected)


# -- the module ----------------------------------------------------------------------------------


def test_a_grpo_step_changes_exactly_the_trainable_weights(grpo_args, sft_checkpoint, tmp_path, length_reward):
    assert main(grpo_args(tmp_path, "--trainer.max_steps=1", '--model.init_args.rewards={"length": 1.0}')) == 0
    before, after = trained_weights(sft_checkpoint), trained_weights(newest_last_checkpoint(tmp_path))
    assert set(before) == set(after) and before
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, unchanged[:5]
    logged = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))[-1]
    for name in ("train/loss", "train/reward", "train/reward_std", "train/frac_reward_zero_std", "train/kl",
                 "train/clip_ratio", "train/completion_length", "train/rewards/length/mean",
                 "train/rewards/length/std", "train/rewards/length/characters"):
        assert logged[name] != "", name
    assert float(logged["train/reward_std"]) > 0
    table = list(csv.DictReader(open(next(tmp_path.rglob("completions.csv")))))
    assert len(table) == 8 and {"image", "label", "reward", "length", "completion"} <= set(table[0])
    run = tmp_path / "lightning_logs" / "version_0"  # trainer.log_dir: the CSV and TensorBoard logs side by side
    assert {"metrics.csv", "completions.csv"} <= {path.name for path in run.iterdir()}
    events = EventAccumulator(str(run))
    events.Reload()
    assert "train/reward" in events.Tags()["scalars"] and "train/completions/text_summary" in events.Tags()["tensors"]


def test_the_tag_rewards_are_logged_with_their_parts(grpo_args, tmp_path):
    assert main(grpo_args(tmp_path, "--trainer.max_steps=1", "--model.init_args.num_generations=2")) == 0
    logged = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))[-1]
    for name in ("format/grammar", "format/grounded_step", "format/boxes_in_image", "format/answer_in_labels",
                 "answer/answered", "grounding/mean_iou", "grounding/hallucinations", "grounding/misses",
                 "grounding/claims", "format/mean", "answer/mean", "grounding/mean"):
        assert logged[f"train/rewards/{name}"] != "", name


def test_tag_fit_with_a_shuffled_reward_pays_each_group_its_earned_rewards_in_another_order(grpo_args, tmp_path,
                                                                                          length_reward):
    """The ablation's path through `tag fit`: `completions.csv` holds what each answer earned and what it was
    paid; per group the paid totals are the earned ones, in the order the group's seed draws."""
    assert main(grpo_args(tmp_path, "--trainer.max_steps=1", "--data.batch_size=2",
                          "--model.init_args.num_generations=4", "--model.init_args.rollout_seed=3",
                          '--model.init_args.rewards={"length": 1.0}', "--model.init_args.shuffled_rewards=[length]")) == 0
    table = list(csv.DictReader(open(next(tmp_path.rglob("completions.csv")))))
    assert len(table) == 8
    earned = torch.tensor([float(row["length"]) for row in table])
    paid = torch.tensor([float(row["reward"]) for row in table])
    keys = [f"shuffle:3:0:{table[row]['image']}" for row in (0, 4)]
    assert torch.allclose(paid, shuffled_within_groups(earned, 4, keys), atol=2e-4)
    assert not torch.allclose(paid, earned, atol=2e-4)  # these seeds' orders are not both the identity


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_weights_and_prompts_of_an_uninterrupted_one(grpo_args, tmp_path, length_reward):
    """Stopped after step 3 (mid-epoch, batch 1) and resumed to 5 == 5 steps in one go: same weights, and
    the same images at the same steps (no prompt repeated, no optimizer step repeated)."""
    common = ["--data.batch_size=1", '--model.init_args.rewards={"length": 1.0}']
    assert main(grpo_args(tmp_path / "whole", *common, "--trainer.max_steps=5")) == 0
    assert main(grpo_args(tmp_path / "parts", *common, "--trainer.max_steps=3")) == 0
    first_part = newest_last_checkpoint(tmp_path / "parts")
    assert main(grpo_args(tmp_path / "parts", *common, "--trainer.max_steps=5", f"--ckpt_path={first_part}")) == 0
    resumed = newest_last_checkpoint(tmp_path / "parts")
    assert torch.load(resumed, weights_only=True)["global_step"] == 5
    whole = trained_weights(newest_last_checkpoint(tmp_path / "whole"))
    assert all(torch.equal(whole[name], value) for name, value in trained_weights(resumed).items())

    def shown(root: Path) -> list[tuple[str, str]]:
        rows = [row for path in sorted(root.rglob("completions.csv")) for row in csv.DictReader(open(path))]
        return [(row["step"], row["image"], row["completion"]) for row in rows]

    assert shown(tmp_path / "parts") == shown(tmp_path / "whole")


@pytest.mark.parametrize("override, message", [
    ("--model.init_args.num_generations=1", "num_generations must be at least 2"),
    ('--model.init_args.rewards={"format": 0.0, "answer": 0}', "every reward weight is 0"),
    ("--model.init_args.init_from=/nowhere/last.ckpt", "model.init_args.init_from: /nowhere/last.ckpt: No such file"),
    ('--model.init_args.rewards={"format": 1.0, "accuracy": 1.0}', "unknown reward(s) ['accuracy']"),
    ("--model.init_args.loss_type=ppo", "loss_type 'ppo' is not one of grpo, bnpo, dr_grpo, dapo"),
    ("--model.init_args.network.init_args.config.lora.r=4",
     "was trained with another model set-up (lora.r: checkpoint 8, configured 4)"),
    ("--data.trace_format=paper", "data.trace_format is paper, but init_from"),  # the SFT run wrote per_step
    ("--model.init_args.shuffled_rewards=[au_f1]", "shuffled_rewards ['au_f1'] are not paid"),
])
def test_bad_configs_fail_before_training_with_one_clear_line(grpo_args, tmp_path, capsys, override, message):
    try:
        status = main(grpo_args(tmp_path, override))
    except SystemExit as exit_:  # the configuration parser's own exit
        status = exit_.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


SGD_NO_CLIPPING = ['--model.init_args.rewards={"length": 1.0}', "--trainer.max_steps=1",
                   "--model.init_args.optimizer.class_path=torch.optim.SGD", "--model.init_args.optimizer.init_args.lr=1.0",
                   "--model.init_args.max_grad_norm=null", "--data.batch_size=2", "--model.init_args.num_generations=4"]


def logged(root: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) of every row of `root`'s metrics.csv that logged `name`."""
    rows = csv.DictReader(open(next(root.rglob("metrics.csv"))))
    return [(int(row["step"]), float(row[name])) for row in rows if row.get(name)]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_a_step_does_not_depend_on_how_it_is_split_into_micro_batches(grpo_args, sft_checkpoint, tmp_path,
                                                                       length_reward, loss_type):
    """8 completions in one pass, or in passes of 3, 3 and 2: the same update (SGD, no clipping: the
    weights move by the gradient itself) and the same logged loss, the one backpropagated."""
    for name, size in (("whole", "null"), ("split", "3")):
        assert main(grpo_args(tmp_path / name, *SGD_NO_CLIPPING, f"--model.init_args.loss_type={loss_type}",
                              f"--model.init_args.micro_batch_size={size}")) == 0
    whole, split = (trained_weights(newest_last_checkpoint(tmp_path / name)) for name in ("whole", "split"))
    start = trained_weights(sft_checkpoint)
    assert any(not torch.allclose(whole[name], start[name], atol=1e-4) for name in whole), "training changed nothing"
    for name in whole:  # lr 1: a 1/9 instead of 1/8 weight on some rows moves weights by ~1e-3
        assert torch.allclose(whole[name], split[name], rtol=1e-5, atol=1e-6), name
    ((_, loss_whole),), ((_, loss_split),) = logged(tmp_path / "whole", "train/loss"), logged(tmp_path / "split",
                                                                                              "train/loss")
    assert loss_split == pytest.approx(loss_whole, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("log_every, logged_steps", [(1, [0, 2]), (2, [0, 2]), (3, [2])])
def test_one_step_axis_with_several_optimizer_steps_a_batch(grpo_args, tmp_path, length_reward, log_every,
                                                            logged_steps):
    """μ = 2: two batches of rollouts are optimizer steps 0-1 and 2-3; every log says 0 or 2 (a batch is
    logged when its steps reach a multiple of `log_every_n_steps`: with 3, only the second), a checkpoint
    every 2 steps is written at 2 and 4, the run ends at 4; a count that is not a multiple of μ is refused
    before training."""
    common = ['--model.init_args.rewards={"length": 1.0}', "--model.init_args.num_iterations=2",
              "--data.batch_size=1", "--model.init_args.num_generations=2", f"--trainer.log_every_n_steps={log_every}"]
    assert main(grpo_args(tmp_path, *common, "--trainer.max_steps=4",
                          "--trainer.callbacks.init_args.every_n_train_steps=2")) == 0
    assert [step for step, _ in logged(tmp_path, "train/loss")] == logged_steps
    assert [int(row["step"]) for row in csv.DictReader(open(next(tmp_path.rglob("completions.csv"))))] == [0, 0, 2, 2]
    events = EventAccumulator(str(next(tmp_path.rglob("completions.csv")).parent))
    events.Reload()
    assert [event.step for event in events.Scalars("train/reward")] == logged_steps
    assert [event.step for event in events.Tensors("train/completions/text_summary")] == [0, 2]
    assert sorted(path.name for path in tmp_path.rglob("*step=*.ckpt")) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    assert torch.load(newest_last_checkpoint(tmp_path), weights_only=True)["global_step"] == 4


@pytest.mark.parametrize("override, message", [
    ("--trainer.max_steps=3", "trainer.max_steps is 3 optimizer steps, not a multiple of num_iterations (2)"),
    ("--trainer.callbacks.init_args.every_n_train_steps=3",
     "ModelCheckpoint's every_n_train_steps is 3 optimizer steps, not a multiple of num_iterations (2)"),
])
def test_step_counts_that_num_iterations_cannot_meet_are_refused(grpo_args, tmp_path, capsys, override, message):
    assert main(grpo_args(tmp_path, "--model.init_args.num_iterations=2", "--trainer.max_steps=4",
                          "--trainer.callbacks.init_args.every_n_train_steps=2", override)) == 2
    err = capsys.readouterr().err
    assert message in err and "use 2 or 4" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_run_whose_completions_are_all_masked_says_so_once(grpo_args, tmp_path, length_reward, recwarn):
    """One-token completions never end, so all are truncated: with mask_truncated_completions nothing counts."""
    assert main(grpo_args(tmp_path, '--model.init_args.rewards={"length": 1.0}', "--trainer.max_steps=2",
                          "--model.init_args.max_completion_length=1", "--model.init_args.mask_truncated_completions=true",
                          "--data.batch_size=1", "--model.init_args.num_generations=2")) == 0
    told = [str(warning.message) for warning in recwarn if "mask_truncated_completions" in str(warning.message)]
    assert len(told) == 1 and "step 0: all 2 completions reached max_completion_length (1 tokens)" in told[0], told


def test_a_bug_shows_its_traceback_and_exit_status_1(grpo_args, tmp_path, capsys, monkeypatch):
    """A ValueError from inside a run is not the user's mistake: no one-line `error:` with status 2."""
    def broken(completion, references):
        raise ValueError("an internal inconsistency")

    monkeypatch.setitem(REWARDS, "length", broken)
    assert main(grpo_args(tmp_path, '--model.init_args.rewards={"length": 1.0}', "--trainer.max_steps=1",
                          "--model.init_args.num_generations=2", "--data.batch_size=1")) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert "internal error (ValueError: an internal inconsistency): this is a bug in tag_lightning" in err
    assert "please report it" in err.splitlines()[-1]


DRIVER = '''"""`tag` with the test reward registered (Lightning's DDP launcher re-runs this script per rank)."""
import json
import os
import sys
sys.path.insert(0, {tests!r})
from helpers import completion_length
from tag_lightning.grounding.claims import read_completion
from tag_lightning.commands.cli import main
from tag_lightning.grounding.rewards import REWARDS
REWARDS["length"] = completion_length
if os.environ.get("ROLLOUT_LENGTHS"):  # record each rank's completion lengths (tokens), a line per step
    from tag_lightning.models.grpo import GRPOModule
    rollout = GRPOModule._rollout
    def recorded(self, batch):
        rollouts = rollout(self, batch)
        with open(f"{{os.environ['ROLLOUT_LENGTHS']}}.rank{{self.global_rank}}", "a") as out:
            out.write(json.dumps([len(ids) for ids in rollouts.token_ids]) + "\\n")
        return rollouts
    GRPOModule._rollout = recorded
if os.environ.get("COLLECTIVES"):  # record, per rank and step, the all-gathers of a rollout and the all-reduces
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from tag_lightning.models.grpo import GRPOModule
    counts = {{"all_gathers": 0, "all_reduce_rounds": 0}}
    gather = dist.all_gather_single
    def counted_gather(*args, **kwargs):
        counts["all_gathers"] += 1
        return gather(*args, **kwargs)
    dist.all_gather_single = counted_gather
    def counted_all_reduce(state, bucket):
        counts["all_reduce_rounds"] += bucket.index() == 0  # a round of gradient buckets
        return allreduce_hook(state, bucket)
    def on_train_start(self):
        if isinstance(self.trainer.model, DistributedDataParallel):
            self.trainer.model.register_comm_hook(None, counted_all_reduce)
    from torch.nn.parallel import DistributedDataParallel
    GRPOModule.on_train_start = on_train_start
    rollout_of_step = GRPOModule._rollout
    def counted_rollout(self, batch):
        before = counts["all_gathers"]
        rollouts = rollout_of_step(self, batch)
        record = {{"all_gathers": counts["all_gathers"] - before,
                   "fsdp_modules": sum(isinstance(m, FSDPModule) for m in self.network.model.modules()),
                   "decode_steps": max(len(ids) for ids in rollouts.token_ids),
                   "resharded": all(isinstance(p, DTensor) for p in self.network.model.parameters())}}
        with open(f"{{os.environ['COLLECTIVES']}}.rank{{self.global_rank}}", "a") as out:
            out.write(json.dumps(record) + "\\n")
        return rollouts
    GRPOModule._rollout = counted_rollout
    def on_train_end(self):
        with open(f"{{os.environ['COLLECTIVES']}}.rank{{self.global_rank}}.reduces", "w") as out:
            out.write(str(counts["all_reduce_rounds"]))
    GRPOModule.on_train_end = on_train_end
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
@pytest.mark.parametrize("shuffled", ["[]", "[length]"])
def test_two_ddp_processes_train_exactly_as_one(grpo_args, sft_checkpoint, tmp_path, shuffled):
    """Batch 1 on each of 2 ranks == batch 2 on one process: the same prompts per step (the sampler shards
    one permutation), the same completions (seeded per image), so the same advantages and weights; with the
    reward paid shuffled (the ablation's path), each group's order drawn on whichever rank holds it.

    SGD, because Adam's first step is lr x sign(gradient): a gradient element that is 0 up to rounding
    (summed in another order on 2 ranks) would move by 2 lr either way and hide what is compared. One
    step: the next rollout is sampled from weights that differ by rounding, and the tiny random model's
    near-uniform distribution over 152k tokens puts a draw on the other side of a token boundary often
    enough to make a second step's completions differ (CI saw it once)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(Path(__file__).parents[1])))
    common = ['--model.init_args.rewards={"length": 1.0}', "--trainer.max_steps=1", "--trainer.accelerator=cpu",
              "--model.init_args.scale_rewards=batch", "--model.init_args.optimizer.class_path=torch.optim.SGD",
              "--model.init_args.optimizer.init_args.lr=1.0", "--model.init_args.micro_batch_size=2",
              f"--model.init_args.shuffled_rewards={shuffled}"]
    single = run_python([str(driver), *grpo_args(tmp_path / "one", *common, "--data.batch_size=2")])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_python([str(driver), *grpo_args(tmp_path / "two", *common, "--data.batch_size=1", strategy="ddp")],
                     env={"COLLECTIVES": str(tmp_path / "collectives")})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # 4 completions a rank in micro-batches of 2: the gradients are all-reduced once, with the second
    reduces = [int(Path(f"{tmp_path / 'collectives'}.rank{rank}.reduces").read_text()) for rank in (0, 1)]
    assert reduces == [1, 1], reduces
    one, two = (trained_weights(newest_last_checkpoint(tmp_path / name)) for name in ("one", "two"))
    start = trained_weights(sft_checkpoint)
    assert any(not torch.allclose(one[name], start[name], atol=1e-4) for name in one), "training changed nothing"
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-6), name

    def rewards(root: Path) -> list[tuple[str, str]]:
        rows = csv.DictReader(open(next(root.rglob("metrics.csv"))))
        return [(row["train/reward"], row["train/reward_std"]) for row in rows if row["train/reward"]]

    assert rewards(tmp_path / "one") == rewards(tmp_path / "two") and len(rewards(tmp_path / "one")) == 1
    if shuffled != "[]":  # some answer was paid another's reward
        table = list(csv.DictReader(open(next((tmp_path / "one").rglob("completions.csv")))))
        assert any(row["reward"] != row["length"] for row in table)


END_TOKENS = range(1000, 21_000)


@pytest.fixture
def early_ending_model(demo_dir, tmp_path) -> Path:
    """The tiny model with 20,000 ordinary tokens added to its generation config's end tokens: its near-uniform
    sampling ends a completion at each token with probability ~0.13, so completions (and ranks) differ in length."""
    folder = tmp_path / "early-ending-model"
    shutil.copytree(demo_dir / "tiny-qwen2.5-vl", folder)
    path = folder / "generation_config.json"
    config = json.loads(path.read_text())
    config["eos_token_id"] = sorted({*config["eos_token_id"], *END_TOKENS})
    path.write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_fsdp2_on_two_processes_trains_as_one_while_ranks_generate_different_lengths(grpo_args, early_ending_model,
                                                                                     tmp_path):
    """FSDP2 with batch 1 on each of 2 ranks == batch 2 on one process (as for DDP above), while each rank's
    rollouts run a different number of generation steps. A rollout gathers the weights once, each sharded
    module's (not once per token), and frees them after it: the peak is one unsharded copy of the weights,
    as without FSDP, and between rollouts every parameter is its shard again. The ranks then decode
    independently. Weights within 1e-5 (gradients are reduce-scattered, so summed in another order than on
    one process).

    The lengths follow from the rollout seed and the images' names, which hold the session's temporary
    folder: a seed whose ranks happen to end at the same step is skipped for the next one."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(Path(__file__).parents[1])))
    common = ['--model.init_args.rewards={"length": 1.0}', "--trainer.max_steps=1", "--trainer.accelerator=cpu",
              "--model.init_args.init_from=null", f"--model.init_args.network.init_args.config.model_path={early_ending_model}",
              "--model.init_args.scale_rewards=batch", "--model.init_args.optimizer.class_path=torch.optim.SGD",
              "--model.init_args.optimizer.init_args.lr=1.0",
              "--model.init_args.max_completion_length=48"]  # long enough that no completion is cut: ends differ
    lengths = {name: tmp_path / f"{name}.lengths" for name in ("one", "two")}
    for seed in range(5):
        shutil.rmtree(tmp_path / "two", ignore_errors=True)
        for rank in (0, 1):
            Path(f"{lengths['two']}.rank{rank}").unlink(missing_ok=True)
        collectives = tmp_path / f"collectives-{seed}"
        sharded = run_python([str(driver), *grpo_args(tmp_path / "two", *common, f"--model.init_args.rollout_seed={seed}",
                                                      "--data.batch_size=1", strategy="fsdp2")],
                             env={"ROLLOUT_LENGTHS": str(lengths["two"]), "COLLECTIVES": str(collectives)})
        assert sharded.returncode == 0, sharded.stderr[-3000:]
        ranks = [json.loads(Path(f"{lengths['two']}.rank{rank}").read_text()) for rank in (0, 1)]
        records = [json.loads(Path(f"{collectives}.rank{rank}").read_text()) for rank in (0, 1)]
        # the ranks run different numbers of generation steps, each more steps than there are sharded modules
        # (else a gather per module and one per token would count alike)
        if max(ranks[0]) != max(ranks[1]) and all(r["decode_steps"] > r["fsdp_modules"] for r in records):
            break
    else:
        pytest.fail(f"5 rollout seeds, none with ranks of different lengths and enough steps (last: {ranks}, {records})")
    for record in records:
        assert record["all_gathers"] == record["fsdp_modules"] < record["decode_steps"], record
        assert record["resharded"], record
    single = run_python([str(driver), *grpo_args(tmp_path / "one", *common, f"--model.init_args.rollout_seed={seed}",
                                                 "--data.batch_size=2")],
                        env={"ROLLOUT_LENGTHS": str(lengths["one"])})
    assert single.returncode == 0, single.stderr[-3000:]
    assert ranks[0] + ranks[1] == json.loads(Path(f"{lengths['one']}.rank0").read_text())  # the same completions
    one, two = (trained_weights(newest_last_checkpoint(tmp_path / name)) for name in ("one", "two"))
    assert set(one) == set(two) and any("lora_B" in name and one[name].any() for name in one), "nothing trained"
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5), name


@pytest.mark.parametrize("lora", [True, False])
def test_the_reference_is_the_policy_grpo_started_from(demo_dir, lora):
    """With LoRA (adapters that change the answers, as after SFT) and in full fine-tuning: the reference pass
    scores as the policy did when GRPO's model was configured, not as the base model, however it trains on."""
    import numpy as np

    from tag_lightning.answers.prompts import user_prompt
    from tag_lightning.models.grpo import GRPOModule
    from tag_lightning.models.vlm import LoRAConfig, VLMConfig, VLMWrapper

    folder = str(demo_dir / "tiny-qwen2.5-vl")
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    network = VLMWrapper(VLMConfig(folder, lora=LoRAConfig(r=4, alpha=8, dropout=0.0) if lora else None))
    inputs = network.build_inputs([image], [user_prompt(["happiness", "anger"])], ["Global analysis: a calm face."])
    base_logps = network.answer_logprobs(inputs)[0]
    trained = [parameter for name, parameter in network.named_parameters() if parameter.requires_grad]
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_B" in name or (not lora and parameter.requires_grad):
                parameter.add_(torch.randn_like(parameter) * (1.0 if lora else 0.05))  # the start: not the base
    start_logps = network.answer_logprobs(inputs)[0]
    assert not torch.allclose(start_logps, base_logps, atol=1e-3)
    module = GRPOModule(network, beta=0.1, num_generations=2)
    module.configure_model()  # the reference is taken here, before any training
    assert torch.equal(module._reference_logprobs(inputs), start_logps)
    with torch.no_grad():
        for parameter in trained:
            parameter.add_(0.05)  # the policy trains on
    moved = network.answer_logprobs(inputs)[0]
    assert not torch.allclose(moved, start_logps, atol=1e-3)
    assert torch.allclose(module._reference_logprobs(inputs), start_logps, atol=1e-6)
    assert torch.equal(network.answer_logprobs(inputs)[0], moved)  # and the policy's weights are back


def test_the_kl_of_the_first_step_after_init_from_is_zero(grpo_args, sft_checkpoint, tmp_path, length_reward):
    """GRPO with beta > 0 from an SFT checkpoint whose adapters moved the model far from the base: the KL to the
    reference at the first step, before any update, is 0 (it was the KL to the model before SFT)."""
    checkpoint = torch.load(sft_checkpoint, weights_only=True)
    for name, value in checkpoint["state_dict"].items():
        if "lora_B" in name:
            checkpoint["state_dict"][name] = torch.randn_like(value)
    moved = tmp_path / "moved-sft.ckpt"
    torch.save(checkpoint, moved)
    assert main(grpo_args(tmp_path, '--model.init_args.rewards={"length": 1.0}', "--trainer.max_steps=1",
                          "--model.init_args.beta=0.04", f"--model.init_args.init_from={moved}")) == 0
    assert logged(tmp_path, "train/kl") == [(0, 0.0)]


def test_a_small_step_raises_the_completions_with_advantage_and_lowers_the_others(demo_dir, sft_checkpoint,
                                                                                 length_reward):
    """The plumbing from rewards to rows to tokens: after a small gradient step on the policy loss, the
    log-probability of each completion moves with its advantage (computed by the module from real rollouts)."""
    from tag_lightning.data.datamodule import FERDataModule, collate
    from tag_lightning.models.grpo import GRPOModule
    from tag_lightning.models.vlm import LoRAConfig, VLMConfig, VLMWrapper

    network = VLMWrapper(VLMConfig(str(demo_dir / "tiny-qwen2.5-vl"), lora=LoRAConfig(r=8, alpha=16, dropout=0.0)))
    module = GRPOModule(network, init_from=str(sft_checkpoint), rewards={"length": 1.0}, num_generations=6,
                        max_completion_length=12, log_completions=False)
    data = FERDataModule(str(demo_dir / "au_cache"), train_data=f"manifest:{demo_dir / 'samples' / 'manifest.csv'}",
                         stage="rl", image_size=224, augment=None, num_workers=0)
    data.setup("fit")
    rollouts = module._rollout(collate([data.items["train"][index] for index in range(2)]))
    advantages = group_advantages(rollouts.rewards, 6)
    ((_, inputs),) = module._chunks(rollouts)
    logps, mask = network.answer_logprobs(inputs)
    loss, _ = policy_loss(logps, logps.detach(), advantages, mask, loss_type="dapo")
    trainable = [parameter for parameter in network.parameters() if parameter.requires_grad]
    with torch.no_grad():
        for parameter, gradient in zip(trainable, torch.autograd.grad(loss, trainable)):
            parameter -= 1e-3 * gradient
        moved = ((network.answer_logprobs(inputs)[0] - logps) * mask).sum(dim=1)
    assert torch.corrcoef(torch.stack([advantages, moved]))[0, 1] > 0.5



def test_a_shuffled_reward_keeps_each_group_s_rewards_but_pays_them_blind_to_the_answer():
    """The ablation's control: a group's rewards in an order drawn from its key alone, uniform over orders
    (the identity included, so a completion expects its group's mean, no more and no less)."""
    values = torch.tensor([0.0, 0.25, 0.5, 1.0, 3.0, 3.0, 3.0, 7.0])
    shuffled = shuffled_within_groups(values, 4, ["a", "b"])
    assert [sorted(group.tolist()) for group in shuffled.view(2, 4)] == [sorted(group.tolist()) for group in values.view(2, 4)]
    assert torch.equal(shuffled, shuffled_within_groups(values, 4, ["a", "b"]))  # a resumed run pays alike
    assert torch.equal(shuffled_within_groups(values, 4, ["c", "b"])[4:], shuffled[4:])  # whatever shares the batch
    orders = [tuple(shuffled_within_groups(torch.arange(4.0), 4, [f"key{n}"]).long().tolist()) for n in range(4800)]
    own = sum(order[0] == 0 for order in orders) / len(orders)
    identity = sum(order == (0, 1, 2, 3) for order in orders) / len(orders)
    assert own == pytest.approx(1 / 4, abs=0.03) and identity == pytest.approx(1 / 24, abs=0.015)
    assert sum(order[0] for order in orders) / len(orders) == pytest.approx(1.5, abs=0.05)  # the group's mean


def test_the_shuffled_ablation_pays_each_group_the_rewards_its_answers_earned_in_another_order(demo_dir):
    """Through `_rollout`: the same rollouts and earned rewards as GRPO's (logged unshuffled), each group's
    totals the same multiset, so its advantages are as large, while the grounding reward is paid shuffled."""
    from tag_lightning.data.datamodule import FERDataModule, collate
    from tag_lightning.errors import BadValue
    from tag_lightning.models.grpo import GRPOModule
    from tag_lightning.models.vlm import VLMConfig, VLMWrapper

    network = VLMWrapper(VLMConfig(str(demo_dir / "tiny-qwen2.5-vl")))
    options = dict(num_generations=4, max_completion_length=4, rollout_seed=7, log_completions=False)
    data = FERDataModule(str(demo_dir / "au_cache"), train_data=f"manifest:{demo_dir / 'samples' / 'manifest.csv'}",
                         stage="rl", image_size=224, augment=None, num_workers=0)
    data.setup("fit")
    batch = collate([data.items["train"][index] for index in range(2)])
    plain = GRPOModule(network, **options)._rollout(batch)
    control = GRPOModule(network, shuffled_rewards=["grounding"], **options)
    shuffled = control._rollout(batch)
    assert shuffled.texts == plain.texts and shuffled.reward_parts.keys() == plain.reward_parts.keys()
    assert all(torch.equal(shuffled.reward_parts[name], plain.reward_parts[name]) for name in plain.reward_parts)
    seeds = [f"shuffle:7:0:{name}" for name in batch["image_name"]]
    parts = plain.reward_parts
    paid = 0.5 * parts["format"] + parts["answer"] + shuffled_within_groups(parts["grounding"], 4, seeds)
    assert torch.allclose(shuffled.rewards, paid)
    # earned rewards that differ within each group by the grounding reward alone (as in the demo's experiment,
    # whose answers all name the right label): every group's advantages are GRPO's, in another order
    earned = {"format": [1.0] * 8, "answer": [1.0] * 8, "grounding": [0.0, 0.2, 0.9, 1.0, 0.1, 0.5, 0.5, 0.7]}
    by_grpo = group_advantages(GRPOModule(network, **options)._pay(earned, ["x", "y"]), 4)
    by_control = group_advantages(control._pay(earned, ["x", "y"]), 4)
    assert not torch.equal(by_control, by_grpo)
    assert torch.allclose(by_control.view(2, 4).sort(dim=1).values, by_grpo.view(2, 4).sort(dim=1).values)
    with pytest.raises(BadValue, match="not paid"):
        GRPOModule(network, rewards={"format": 0.5, "grounding": 0.0}, shuffled_rewards=["grounding"], **options)


# -- learning ------------------------------------------------------------------------------------
# With one-token completions the expected reward is a sum over the vocabulary, sum_v p(v) r(v), with p
# the tempered distribution the rollouts sample from: it is computed exactly, so whether GRPO raises it
# is measured without sampling noise. Temperature 0.1 and 64 answers a face: at 1.0 the tiny random
# model's distribution is nearly uniform over 152k tokens and the cosine between GRPO's gradient and
# the exact gradient of the expected reward, measured on these faces, was anywhere in -0.2..0.44
# (512 answers a face, by seed); at 0.1 it was 0.84 with 128 answers a face and 0.03 with 8.

TEMPERATURE = 0.1


def expected_reward(checkpoint: Path, demo_dir: Path) -> float:
    """Mean over the training faces of sum_v p(v | face, prompt) * length_reward(v), for one token."""
    from tag_lightning.data.datamodule import FERDataModule, collate
    from tag_lightning.models.checkpoints import network_weights, read_checkpoint
    from tag_lightning.models.vlm import LoRAConfig, VLMConfig, VLMWrapper

    network = VLMWrapper(VLMConfig(str(demo_dir / "tiny-qwen2.5-vl"), lora=LoRAConfig(r=8, alpha=16, dropout=0.0)))
    network.load_trainable_state_dict(network_weights(read_checkpoint(checkpoint)))
    data = FERDataModule(str(demo_dir / "au_cache"), train_data=f"manifest:{demo_dir / 'samples' / 'manifest.csv'}",
                         stage="rl", image_size=224, augment=None, num_workers=0)
    data.setup("fit")
    batch = collate(list(data.items["train"]))
    with torch.no_grad():
        logits = network(network.build_inputs([image.numpy() for image in batch["image"]], batch["prompt"])).logits
    logits = logits[:, -1].float() / TEMPERATURE
    logits[:, network.placeholder_ids] = float("-inf")  # never sampled
    # Rows past the tokenizer's vocabulary (padding of the embedding) decode to nothing, as in generation.
    texts = network.processor.tokenizer.batch_decode([[token] for token in range(logits.shape[-1])],
                                                     skip_special_tokens=True)
    rewards = torch.tensor([completion_length(read_completion(text), None).value for text in texts])
    return float((logits.softmax(-1) * rewards).sum(-1).mean())


@pytest.mark.slow
@pytest.mark.parametrize("weight", [1.0, -1.0])
def test_grpo_moves_the_expected_reward_its_way(grpo_args, sft_checkpoint, demo_dir, tmp_path, length_reward, weight):
    """8 steps of configs/grpo.yaml (lr 1e-4, LoRA) rewarding long first tokens make them likelier by
    more than 3% (+8.8% measured); penalising them (weight -1) makes them rarer (-6.9% measured with 2
    threads, -4.6% with the 1 thread of each of the README command's test processes: the samples differ)."""
    assert main(grpo_args(tmp_path, "--trainer.max_steps=8", f'--model.init_args.rewards={{"length": {weight}}}',
                          "--model.init_args.max_completion_length=1", f"--model.init_args.temperature={TEMPERATURE}",
                          "--model.init_args.num_generations=64", "--data.batch_size=4")) == 0
    before = expected_reward(sft_checkpoint, demo_dir)
    after = expected_reward(newest_last_checkpoint(tmp_path), demo_dir)
    assert (after - before) * weight > 0.03 * before, (before, after)
