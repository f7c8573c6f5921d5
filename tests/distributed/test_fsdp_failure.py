"""A rank that fails during an FSDP2 save (DCP's planning driven by ``dcp.planned.save_planned``): every rank raises, nothing
is committed, and the next save commits and loads back. A rank that fails to plan or read a load
(``dcp.planned.load_planned``): every rank raises."""
from __future__ import annotations

import json
import os

from support import TESTS
from support.launch import torchrun

SCRIPT = os.path.join(TESTS, "distributed", "fsdp_failure_script.py")


def test_a_rank_failing_to_plan_write_or_read_fails_the_save_or_load_on_every_rank(tmp_path):
    torchrun(2, SCRIPT, str(tmp_path))
    outs = [json.loads((tmp_path / f"out-{r}.json").read_text()) for r in range(2)]
    for out in outs:
        assert "injected plan failure" in out["plan_failure"], out
        assert out["write_failure"].startswith("CheckpointWriteError") and "no space left" in out["write_failure"], out
        assert out["committed_after_failures"] == [], out
        assert out["good"] == "ok", out
        assert len(out["committed"]) == 1 and out["loaded_equal"], out
        assert "injected: input/output error" in out["read_failure"], out  # (rank 1's error, on both ranks)
        assert "injected load plan failure" in out["load_plan_failure"], out
    # rank 0 (the coordinator) answered: at the plan failure nothing, then each rank once per save that planned;
    # the replicated tensor is DCP-deduplicated onto one rank, so one rank gets its global plan and one "same"
    assert sorted(outs[0]["replies"][-2:]) == ["plan", "same"], outs[0]["replies"]
