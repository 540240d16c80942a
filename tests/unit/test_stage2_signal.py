"""Stage 2's signal for the matched controls, on a hand-built batch: the random region, the
placebo teacher (permute_delta) and the no-teacher `advantage` signal on a teacher's region."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor

from erpd import metrics as M
from erpd.config import PipelineConfig, RuntimeConfig, Stage2Config
from erpd.errors import ConfigError
from erpd.losses import permute_within_rows, random_score, select_region
from erpd.pipeline import run_pipeline
from erpd.rollout import RolloutBatch, Sequences
from erpd.stage2 import Signal, build_signal

ERPD = Path(sys.executable).with_name("erpd")
ROWS, WIDTH = 24, 10


def make_batch(seed: int = 0) -> tuple[RolloutBatch, list[Tensor]]:
    """A batch of ragged responses (1..WIDTH valid tokens, the rest padding) and two teachers'
    log-probs on it, all random but fixed by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, WIDTH + 1, (ROWS,), generator=gen)
    mask = (torch.arange(WIDTH) < lengths.unsqueeze(1)).float()
    pi_k = -torch.rand(ROWS, WIDTH, generator=gen) * 3 * mask
    teachers = [pi_k + torch.randn(ROWS, WIDTH, generator=gen) * mask for _ in range(2)]
    rewards = torch.randint(0, 2, (ROWS,), generator=gen).float()
    seqs = Sequences(
        input_ids=torch.zeros(ROWS, WIDTH + 1, dtype=torch.long),
        attention_mask=torch.ones(ROWS, WIDTH + 1, dtype=torch.long),
        response_mask=mask,
        prompt_len=1,
    )
    batch = RolloutBatch(
        seqs=seqs,
        pi_k_logprobs=pi_k,
        rewards=rewards,
        advantages=rewards - rewards.mean(),
        group_size=4,
        problems=[],
        responses=[""] * ROWS,
    )
    return batch, teachers


def signal(batch: RolloutBatch, teachers: list[Tensor], **cfg: object) -> Signal:
    return build_signal(batch, Stage2Config.model_validate(cfg), teachers)


def valid_count(batch: RolloutBatch) -> int:
    return int(batch.seqs.response_mask.sum())


# --- region random ----------------------------------------------------------------------------
@pytest.mark.parametrize("top_frac", [0.05, 0.2, 0.5, 1.0])
def test_random_region_keeps_the_top_frac_share(top_frac: float) -> None:
    batch, teachers = make_batch()
    found = signal(batch, teachers, region="random", top_frac=top_frac)
    n = valid_count(batch)
    assert int(found.selected.sum()) == max(1, int(top_frac * n + 0.5))  # the rounding of top_frac
    assert not (found.selected & ~batch.seqs.response_mask.bool()).any()  # response tokens only
    assert found.stats[M.SELECTED_FRAC] == pytest.approx(top_frac, abs=1.0 / n)


def test_random_region_is_fixed_by_the_seed_and_ignores_the_teachers() -> None:
    batch, teachers = make_batch()
    runs = [
        signal(batch, teachers, region="random", seed=3).selected,
        signal(batch, teachers[:1], region="random", seed=3).selected,
        signal(batch, [t.flip(0) for t in teachers], region="random", seed=3).selected,
        signal(batch, [], signal="advantage", region="random", seed=3).selected,
    ]
    for other in runs[1:]:
        assert torch.equal(runs[0], other)
    assert not torch.equal(runs[0], signal(batch, teachers, region="random", seed=4).selected)


def test_random_region_is_not_the_extreme_region() -> None:
    batch, teachers = make_batch()
    extreme = signal(batch, teachers, region="top_frac").selected
    random = signal(batch, teachers, region="random").selected
    assert int(extreme.sum()) == int(random.sum())
    assert not torch.equal(extreme, random)


def test_random_score_is_zero_outside_the_mask() -> None:
    batch, _ = make_batch()
    mask = batch.seqs.response_mask
    score = random_score(mask, seed=0)
    assert (score[mask == 0] == 0).all() and (score[mask == 1] > 0).all()
    assert torch.equal(select_region(score, mask, "random", top_frac=1.0), mask.bool())


# --- placebo: permute_delta -------------------------------------------------------------------
def test_permutation_keeps_each_responses_values_and_moves_them() -> None:
    batch, teachers = make_batch()
    mask = batch.seqs.response_mask
    deltas = [(t - batch.pi_k_logprobs) * mask for t in teachers]
    permuted = permute_within_rows(deltas, mask, seed=0)
    valid = mask.bool()
    moved = 0
    for d, p in zip(deltas, permuted, strict=True):
        for row in range(ROWS):
            before, after = d[row][valid[row]], p[row][valid[row]]
            assert torch.equal(before.sort().values, after.sort().values)  # same multiset
            moved += int(not torch.equal(before, after))
        assert (p[~valid] == d[~valid]).all()  # padding untouched
    # every response with two or more tokens can move (a short one may draw the identity)
    movable = 2 * int((valid.sum(1) >= 2).sum())
    assert moved >= 0.75 * movable


def test_permutation_is_seeded_and_shared_by_the_teachers() -> None:
    batch, teachers = make_batch()
    mask = batch.seqs.response_mask
    first = (teachers[0] - batch.pi_k_logprobs) * mask
    second = (2.0 * first + 1.0) * mask  # a second teacher tied to the first token by token
    a, b = permute_within_rows([first, second], mask, seed=5)
    torch.testing.assert_close(b, (2.0 * a + 1.0) * mask)  # one permutation per response
    again = permute_within_rows([first], mask, seed=5)[0]
    assert torch.equal(a, again)
    assert not torch.equal(a, permute_within_rows([first], mask, seed=6)[0])


def test_placebo_signal_is_the_students_signal_shuffled_within_responses() -> None:
    batch, teachers = make_batch()
    valid = batch.seqs.response_mask.bool()
    student = signal(batch, teachers, region="all")
    placebo = signal(batch, teachers, region="all", permute_delta=True)
    for row in range(ROWS):
        torch.testing.assert_close(
            student.values[row][valid[row]].sort().values,
            placebo.values[row][valid[row]].sort().values,
        )
    assert not torch.equal(student.values, placebo.values)
    assert torch.equal(
        placebo.values, signal(batch, teachers, region="all", permute_delta=True).values
    )
    # the region is built from the shuffled deltas too: the same size, other tokens
    top = signal(batch, teachers, permute_delta=True)
    assert int(top.selected.sum()) == int(signal(batch, teachers).selected.sum())
    assert not torch.equal(top.selected, signal(batch, teachers).selected)


# --- advantage on a teacher's region ----------------------------------------------------------
@pytest.mark.parametrize(
    "region",
    [
        {"region": "top_frac"},
        {"region": "top_frac", "top_frac": 0.05},
        {"region": "threshold", "threshold": 1.0},
    ],
)
def test_advantage_keeps_exactly_the_students_region(region: dict[str, object]) -> None:
    batch, teachers = make_batch()
    student = signal(batch, teachers, **region)
    control = signal(batch, teachers, signal="advantage", **region)
    assert torch.equal(control.selected, student.selected)
    assert 0 < int(control.selected.sum()) < valid_count(batch)
    expected = batch.advantages.unsqueeze(1).expand(ROWS, WIDTH) * control.selected
    torch.testing.assert_close(control.values, expected)
    assert control.stats[M.SELECTED_FRAC] == student.stats[M.SELECTED_FRAC]
    assert control.stats[M.SELECTED_FRAC] == pytest.approx(
        int(student.selected.sum()) / valid_count(batch)
    )


def test_advantage_on_the_placebos_region() -> None:
    batch, teachers = make_batch()
    placebo = signal(batch, teachers, permute_delta=True)
    control = signal(batch, teachers, signal="advantage", permute_delta=True)
    assert torch.equal(control.selected, placebo.selected)


def test_advantage_without_teachers_on_all_tokens() -> None:
    batch, _ = make_batch()
    found = signal(batch, [], signal="advantage", region="all")
    assert torch.equal(found.selected, batch.seqs.response_mask.bool())
    assert found.stats[M.SELECTED_FRAC] == 1.0


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"signal": "advantage"}, "stage2.region"),  # top_frac, the default region
        ({"signal": "advantage", "region": "threshold", "threshold": 1.0}, "stage2.region"),
        ({"signal": "advantage", "region": "all", "permute_delta": True}, "stage2.permute_delta"),
        ({"signal": "logratio", "region": "random"}, "stage2.signal"),
    ],
)
def test_what_needs_a_teacher_is_refused_in_one_line(cfg: dict[str, object], field: str) -> None:
    batch, _ = make_batch()
    with pytest.raises(ConfigError) as err:
        signal(batch, [], **cfg)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ") and "\n" not in str(err.value)


def test_cli_refuses_advantage_on_a_teachers_region_without_a_teacher(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(ERPD), "stage2", "--model", str(tmp_path), "--batch", str(tmp_path), "--out",
         str(tmp_path / "out"), "--set", "stage2.signal=advantage"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "stage2.region" in lines[0] and "'random' or 'all'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_pipeline_without_teachers_is_refused_before_any_work(tmp_path: Path) -> None:
    # refused by the config itself (so the API refuses it at submission) and, for a config
    # built without validation, by run_pipeline before pretraining or sampling
    with pytest.raises(ValidationError, match=r"no teachers: stage2\.region 'top_frac'"):
        PipelineConfig.model_validate({"teachers": [], "stage2": {"signal": "advantage"}})
    cfg = PipelineConfig.model_construct(
        teachers=[], stage2=Stage2Config(signal="advantage"), runtime=RuntimeConfig(device="cpu")
    )
    with pytest.raises(ConfigError, match=r"^stage2\.region: "):
        run_pipeline(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # no base pretrained, no batch sampled
