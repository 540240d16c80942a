"""torch's thread count is set deliberately per process (runtime.threads), never left to
oversubscribe a shared machine."""

from __future__ import annotations

import torch

from erpd.config import PipelineConfig
from erpd.models import set_threads, usable_cores
from erpd.stage import StageEnv


def test_threads_follow_the_config_or_the_process_share_of_the_cores() -> None:
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
        assert set_threads(None) == usable_cores() == torch.get_num_threads()
        share = max(1, usable_cores() // 4)
        assert set_threads(None, ranks=4) == share == torch.get_num_threads()
        cfg = PipelineConfig.model_validate({"runtime": {"device": "cpu", "threads": 1}})
        StageEnv.of(cfg)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
