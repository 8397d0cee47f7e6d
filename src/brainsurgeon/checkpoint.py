"""Checkpoints of a scheduled run, saved atomically after every round, so ``--resume`` can continue.

A checkpoint directory holds ``round_NNN.safetensors`` (the model's weights under ``model.``, the
keep-masks under ``mask.`` as uint8, the torch RNG state as ``rng``) and ``state.json`` (round index,
rounds in all, the recipe's hash, the history so far, the name of the weights file). The weights are
written first, then ``state.json`` is replaced atomically, then the previous weights are deleted: a
kill at any point leaves a consistent pair. Nothing is unpickled.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from .errors import BrainsurgeonError
from .io import atomic_path, write_json

STATE = "state.json"
REPORT = "final_report.json"


class Checkpoint:
    """Save/load the state of a scheduled run in ``directory``; ``recipe_hash`` guards against resuming a different run."""

    def __init__(self, directory: str | Path, recipe_hash: str) -> None:
        self.dir = Path(directory)
        self.recipe_hash = recipe_hash

    @property
    def state_path(self) -> Path:
        return self.dir / STATE

    def exists(self) -> bool:
        return self.state_path.exists()

    def clear(self) -> None:
        """Remove an earlier run's checkpoint (a fresh run without ``--resume``)."""
        if self.state_path.exists():
            weights = self._read_state().get("weights")
            if weights:
                (self.dir / weights).unlink(missing_ok=True)
            self.state_path.unlink()
        (self.dir / REPORT).unlink(missing_ok=True)

    def save(self, round_index: int, rounds: int, model: nn.Module, masks: dict, history: list) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        tensors.update({f"mask.{k}": v.detach().to(torch.uint8).contiguous().cpu() for k, v in masks.items()})
        tensors["rng"] = torch.get_rng_state()
        name = f"round_{round_index:03d}.safetensors"
        with atomic_path(self.dir / name) as tmp:
            save_file(tensors, str(tmp))
        previous = self._read_state().get("weights") if self.exists() else None
        write_json(self.state_path, {
            "round": round_index, "rounds": rounds, "recipe_hash": self.recipe_hash, "weights": name, "history": history,
        })
        if previous and previous != name:
            (self.dir / previous).unlink(missing_ok=True)

    def _read_state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BrainsurgeonError(f"checkpoint {self.state_path} is unreadable ({e}); run again without --resume") from e

    def load(self, model: nn.Module, rounds: int):
        """``(model, masks, history, next_round)`` from the last completed round; ``model`` is not mutated."""
        from safetensors.torch import load_file

        if not self.exists():
            raise BrainsurgeonError(
                f"no checkpoint to resume in {self.dir} (no {STATE}); run without --resume to start from the beginning"
            )
        state = self._read_state()
        if state.get("recipe_hash") != self.recipe_hash:
            raise BrainsurgeonError(
                f"the checkpoint in {self.dir} was made by a different recipe (hash {state.get('recipe_hash')!r}, "
                f"this one {self.recipe_hash!r}); resume with the same recipe, or run without --resume"
            )
        if state.get("rounds") != rounds:
            raise BrainsurgeonError(f"the checkpoint has {state.get('rounds')} rounds, this run {rounds}; run without --resume")
        weights = self.dir / state["weights"]
        if not weights.exists():
            raise BrainsurgeonError(f"checkpoint weights {weights} are missing; run without --resume")
        tensors = load_file(str(weights))
        work = copy.deepcopy(model)
        state_dict = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            work.load_state_dict(state_dict)
        except RuntimeError as e:
            raise BrainsurgeonError(f"checkpoint weights do not fit the model ({e}); run without --resume") from e
        masks = {k[len("mask."):]: v.bool() for k, v in tensors.items() if k.startswith("mask.")}
        torch.set_rng_state(tensors["rng"])
        return work.train(model.training), masks, list(state["history"]), int(state["round"])

    def save_report(self, report: dict) -> None:
        write_json(self.dir / REPORT, report)

    def final_report(self) -> dict:
        path = self.dir / REPORT
        if not path.exists():
            raise BrainsurgeonError(f"the checkpoint in {self.dir} is complete but has no {REPORT}; run without --resume")
        return json.loads(path.read_text())
