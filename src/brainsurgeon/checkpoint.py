"""Checkpoints of a scheduled run, saved atomically after every round, so ``--resume`` can continue.

A checkpoint directory holds ``round_NNN.safetensors`` (the model's weights under ``model.``, the
keep-masks under ``mask.`` as uint8, the torch RNG state as ``rng``) and ``state.json`` (round index,
rounds in all, the recipe's hash, the history so far, the name of the weights file). The weights are
written first, then ``state.json`` is replaced atomically, then the previous weights are deleted: a
kill at any point leaves a consistent pair. Nothing is unpickled.

Loading validates before it uses anything: ``state.json`` must hold the expected fields, and its
weights name a plain ``round_NNN.safetensors`` in the directory (never a path elsewhere); the weights
must be readable safetensors (a truncated file is a one-line error) whose model entries have the
model's names, shapes and dtypes, whose masks are 0/1 with their layer's shape, and whose RNG state is
the size torch uses.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from torch import nn

from .errors import BrainsurgeonError
from .io import atomic_path, own_ties, untie, write_json

STATE = "state.json"
REPORT = "final_report.json"
WEIGHTS_NAME = re.compile(r"round_\d{3,}\.safetensors")


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
            try:
                weights = self._read_state().get("weights")
            except BrainsurgeonError:
                weights = None  # a damaged state names nothing safe to delete: only the state goes
            if weights:
                (self.dir / weights).unlink(missing_ok=True)
            self.state_path.unlink()
        (self.dir / REPORT).unlink(missing_ok=True)

    def save(self, round_index: int, rounds: int, model: nn.Module, masks: dict, history: list) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        arrays, _ = untie(model.state_dict())  # a tied parameter is stored once; load() re-ties it
        tensors = {f"model.{k}": v for k, v in arrays.items()}
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
            state = json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BrainsurgeonError(f"checkpoint {self.state_path} is unreadable ({e}); run again without --resume") from e
        bad = _state_problem(state)
        if bad:
            raise BrainsurgeonError(f"checkpoint {self.state_path} is damaged ({bad}); run again without --resume")
        return state

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
        if not weights.is_file():
            raise BrainsurgeonError(f"checkpoint weights {weights} are missing; run without --resume")
        try:
            tensors = load_file(str(weights))
        except Exception as e:  # safetensors raises its own types for truncated or garbled files
            raise BrainsurgeonError(f"checkpoint weights {weights} are unreadable (truncated or corrupted?): {e}; "
                                    "run without --resume") from e
        state_dict = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        for alias, kept in own_ties(model).items():  # a parameter the model ties may be stored once
            if alias not in state_dict and kept in state_dict:
                state_dict[alias] = state_dict[kept]
        masks = {k[len("mask."):]: v for k, v in tensors.items() if k.startswith("mask.")}
        bad = _tensors_problem(model, state_dict, masks, tensors.get("rng"))
        if bad:
            raise BrainsurgeonError(f"checkpoint weights {weights} do not fit the model ({bad}); run without --resume")
        work = copy.deepcopy(model)
        with torch.no_grad():  # copy into the copy's own tensors: ties and dtypes stay the model's
            for name, t in work.state_dict(keep_vars=True).items():
                t.copy_(state_dict[name])
        torch.set_rng_state(tensors["rng"])
        return work.train(model.training), {k: v.bool() for k, v in masks.items()}, list(state["history"]), int(state["round"])

    def save_report(self, report: dict) -> None:
        write_json(self.dir / REPORT, report)

    def final_report(self) -> dict:
        path = self.dir / REPORT
        if not path.exists():
            raise BrainsurgeonError(f"the checkpoint in {self.dir} is complete but has no {REPORT}; run without --resume")
        return json.loads(path.read_text())


def _state_problem(state) -> str | None:
    """What is wrong with a ``state.json`` (None: nothing)."""
    if not isinstance(state, dict):
        return f"a JSON object is expected, got {type(state).__name__}"
    missing = [k for k in ("round", "rounds", "recipe_hash", "weights", "history") if k not in state]
    if missing:
        return f"missing {missing}"
    weights = state["weights"]
    if not isinstance(weights, str) or not WEIGHTS_NAME.fullmatch(weights):
        return f"'weights' must name a round_NNN.safetensors file in the checkpoint directory, got {str(weights)[:80]!r}"
    for key in ("round", "rounds"):
        if key in state and (isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0):
            return f"{key!r} must be a non-negative integer, got {state[key]!r}"
    if "history" in state and not isinstance(state["history"], list):
        return "'history' must be a list"
    return None


def _tensors_problem(model: nn.Module, state_dict: dict, masks: dict, rng) -> str | None:
    """What does not fit between a checkpoint's tensors and ``model`` (None: everything fits)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        return f"model entries missing {missing[:5]}, unexpected {unexpected[:5]}"
    for name, t in own.items():
        if state_dict[name].shape != t.shape or state_dict[name].dtype != t.dtype:
            return f"{name}: checkpoint {tuple(state_dict[name].shape)} {state_dict[name].dtype}, model {tuple(t.shape)} {t.dtype}"
    for name, m in masks.items():
        shape = _mask_shape(model, name)
        if shape is None or m.shape != shape or m.dtype != torch.uint8 or bool((m > 1).any()):
            return f"mask {name!r}: not a 0/1 uint8 mask of a layer of the model"
    expected_rng = torch.get_rng_state()
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.shape != expected_rng.shape:
        return "the RNG state is missing or has the wrong size"
    return None


def _mask_shape(model: nn.Module, name: str):
    """The shape of the weight a mask name keys: a module's ``weight``, or a parameter's full name."""
    try:
        return model.get_submodule(name).weight.shape
    except AttributeError:
        pass
    try:
        return model.get_parameter(name).shape
    except AttributeError:
        return None
