"""Text for language models: calibration windows and perplexity (``bs.text``).

A *text* argument is a string, a path, or a list of either:

* a :class:`pathlib.Path` is always a file (UTF-8);
* a ``str`` that names an existing file is that file; any other ``str`` is the text itself;
* :class:`Text` marks a string as literal text even when it names an existing file
  (``bs.text.Text("notes.txt")`` is the nine characters ``notes.txt``);
* a list is several documents: each is tokenised on its own and the token streams are joined (with
  the tokenizer's end-of-sequence token between them when it has one), in the order given.

A ``str`` without whitespace that looks like a file name (it contains a path separator or ends in
``.txt``/``.md``...) but names no file is refused: it is almost always a mistyped path. Wrap it in
:class:`Text` to use it as text.

Tokens come from ``tokenizer(text, add_special_tokens=False)``: no BOS is inserted, so every window
is a plain slice of the token stream, the same for calibration and evaluation.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Union

import torch
import torch.nn.functional as F

from .errors import BrainsurgeonError

__all__ = ["Text", "calibration", "perplexity", "read_documents", "tokenize", "sample_windows", "perplexity_of_ids", "check_model_tokenizer"]

PATH_SUFFIXES = (".txt", ".text", ".md", ".rst", ".csv", ".json", ".jsonl", ".html", ".xml")


class Text(str):
    """A string that is always literal text, never a file name."""


TextSource = Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]


def _looks_like_path(s: str) -> bool:
    return bool(s) and not any(c.isspace() for c in s) and (os.sep in s or "/" in s or s.lower().endswith(PATH_SUFFIXES))


def _read(path: Path) -> str:
    if not path.is_file():
        raise BrainsurgeonError(f"text file {path} does not exist (or is not a file); give an existing UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BrainsurgeonError(f"text file {path} is not UTF-8 ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def read_documents(text: TextSource) -> list[str]:
    """The documents of a text argument (see the module docstring), as strings."""
    items = [text] if isinstance(text, (str, os.PathLike)) else text
    if not isinstance(items, (list, tuple)):
        raise BrainsurgeonError(f"text must be a string, a path, or a list of them; got {type(text).__name__}")
    if not items:
        raise BrainsurgeonError("text is an empty list; give at least one string or file")
    docs = []
    for item in items:
        if isinstance(item, Text):
            docs.append(str(item))
        elif isinstance(item, os.PathLike):
            docs.append(_read(Path(item)))
        elif isinstance(item, str):
            if os.path.isfile(item):
                docs.append(_read(Path(item)))
            elif _looks_like_path(item):
                raise BrainsurgeonError(
                    f"text {item!r} looks like a file name but no such file exists; fix the path, "
                    "or wrap it in bs.text.Text(...) to use the string itself as text"
                )
            else:
                docs.append(item)
        else:
            raise BrainsurgeonError(f"text items must be strings or paths; got {type(item).__name__}")
    return docs


def tokenize(tokenizer, text: TextSource) -> torch.Tensor:
    """The token ids of a text argument as one 1-D LongTensor (documents joined by EOS)."""
    docs = read_documents(text)
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i and eos is not None:
            ids.append(int(eos))
        # verbose=False: a whole novel is longer than model_max_length, which is fine here
        ids.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def _check_len(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BrainsurgeonError(f"{name} must be a positive integer, got {value!r}")
    return value


def sample_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``num_samples`` non-overlapping windows of ``seq_len`` tokens from a 1-D token stream, at random
    places (a random offset, then a random choice of the aligned slots), reproducible by ``seed``."""
    num_samples, seq_len = _check_len(num_samples, "num_samples"), _check_len(seq_len, "seq_len")
    total = ids.numel()
    need = num_samples * seq_len
    if total < need:
        raise BrainsurgeonError(
            f"the text has {total} tokens, fewer than num_samples x seq_len = {num_samples} x {seq_len} = {need}; "
            "give more text or ask for fewer/shorter samples"
        )
    g = torch.Generator().manual_seed(int(seed))
    offset = int(torch.randint(0, min(seq_len - 1, total - need) + 1, (1,), generator=g))
    slots = (total - offset) // seq_len
    chosen = torch.randperm(slots, generator=g)[:num_samples].sort().values
    starts = offset + chosen * seq_len
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def calibration(tokenizer, text: TextSource, num_samples: int = 128, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """Calibration batch for ``bs.prune``: a LongTensor ``(num_samples, seq_len)`` of random,
    non-overlapping windows of the tokenised text, the same for the same seed."""
    return sample_windows(tokenize(tokenizer, text), num_samples, seq_len, seed)


def _vocab_size(model) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or not hasattr(emb, "num_embeddings"):
        raise BrainsurgeonError(f"{type(model).__name__} has no input embedding; give a causal language model")
    return int(emb.num_embeddings)


def check_model_tokenizer(model, tokenizer, seq_len: int | None = None) -> None:
    """One-line errors for a tokenizer whose ids the model cannot embed, or windows longer than the
    model's context."""
    vocab = _vocab_size(model)
    if len(tokenizer) > vocab:
        raise BrainsurgeonError(
            f"the tokenizer has {len(tokenizer)} tokens but the model embeds only {vocab}: they do not belong "
            "together; use the tokenizer saved with the model"
        )
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if seq_len is not None and context is not None and seq_len > context:
        raise BrainsurgeonError(f"seq_len={seq_len} exceeds the model's context of {context} tokens; use seq_len <= {context}")


def perplexity_of_ids(model, ids: torch.Tensor, seq_len: int = 512, max_windows: int | None = None) -> dict:
    """Perplexity of a causal LM on the non-overlapping windows of a 1-D token stream.

    ``exp(sum NLL / count)`` over every predicted token (each window predicts its ``seq_len - 1``
    last tokens from the ones before); the NLLs are summed in float64. The model is run in
    inference mode and its train/eval state is restored. Returns ``{"perplexity", "nll",
    "tokens", "windows"}``."""
    seq_len = _check_len(seq_len, "seq_len")
    if seq_len < 2:
        raise BrainsurgeonError("seq_len must be at least 2 (a window predicts its tokens after the first)")
    windows = ids.numel() // seq_len
    if max_windows is not None:
        windows = min(windows, _check_len(max_windows, "max_windows"))
    if windows == 0:
        raise BrainsurgeonError(f"the text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}; give more text")
    vocab = _vocab_size(model)
    if int(ids[: windows * seq_len].max()) >= vocab:
        raise BrainsurgeonError(
            f"token id {int(ids[: windows * seq_len].max())} is outside the model's vocabulary of {vocab}: tokenizer and model do not match"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        with torch.inference_mode():
            for w in range(windows):
                x = ids[w * seq_len:(w + 1) * seq_len].unsqueeze(0).to(device)
                logits = model(input_ids=x, use_cache=False).logits[0, :-1]
                nll = F.cross_entropy(logits.float(), x[0, 1:], reduction="none")
                total += nll.double().sum().cpu()
    finally:
        model.train(was_training)
    count = windows * (seq_len - 1)
    mean = float(total) / count
    if not math.isfinite(mean):
        raise BrainsurgeonError("the model's negative log-likelihood is not finite (NaN/inf logits); check the weights")
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "windows": windows}


def perplexity(model, tokenizer, text: TextSource, seq_len: int = 512, max_windows: int | None = None) -> float:
    """``exp(mean token NLL)`` of a causal LM over the non-overlapping ``seq_len`` windows of the text
    (at most ``max_windows``, from the start). See :func:`perplexity_of_ids`."""
    seq_len = _check_len(seq_len, "seq_len")
    check_model_tokenizer(model, tokenizer, seq_len)
    return perplexity_of_ids(model, tokenize(tokenizer, text), seq_len, max_windows)["perplexity"]
