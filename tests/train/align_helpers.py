"""Shared by the align tests (images and audio): interrupted runs resumed to the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from safetensors.torch import load_file

from vishwamai_edge.train.align import ALIGNED, align

QUIET = Console(stderr=True, quiet=True)


class Stop(Exception):
    pass


def weights(folder: Path) -> dict:
    """The aligned folder's trained tensors: projector and LLM."""
    out = {f"projector.{k}": v for k, v in load_file(str(folder / "projector.safetensors")).items()}
    for f in sorted((folder / "llm").glob("*.safetensors")):
        out.update({f"llm.{k}": v for k, v in load_file(str(f)).items()})
    return out


def assert_resumes_exactly(recipe, llm_dir: Path, tmp_path: Path, finished: Path, stops=(2, 5)) -> None:
    """Interrupted after each step in `stops`, resumed: the same weights as the uninterrupted `finished` folder."""
    for stop_at in stops:
        def stop(step, loss, at=stop_at):
            if step == at:
                raise Stop

        with pytest.raises(Stop):
            align(recipe, llm_dir, tmp_path / f"cut{stop_at}", "run", console=QUIET, on_step=stop)
        resumed = align(recipe, llm_dir, tmp_path / f"cut{stop_at}", "run", resume=True, console=QUIET)
        assert resumed.resumed_from == stop_at
        want, got = weights(finished), weights(tmp_path / f"cut{stop_at}" / ALIGNED)
        assert want.keys() == got.keys()
        worst = max(float((want[k] - got[k]).abs().max()) for k in want)
        assert worst < 1e-6, (stop_at, worst)
