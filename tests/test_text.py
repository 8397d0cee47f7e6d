"""bs.text: text sources, calibration windows and perplexity, on a tiny random Llama with a word-level
tokenizer trained here (no downloads, no material)."""
from __future__ import annotations

import math
import random

import pytest
import torch

import brainsurgeon as bs
from brainsurgeon import text as bstext

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = (
    "the a lady gentleman house letter walk dinner sister brother said was had could would very much "
    "not never always evening morning ball visit family fortune marriage , . ; !"
).split()


def corpus(n_words: int = 3000, seed: int = 0) -> str:
    """Deterministic pseudo-sentences from a small vocabulary, one per line."""
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) == 12:
            lines.append(" ".join(line))
            line = []
    return "\n".join(lines + [" ".join(line)])


def tiny_tokenizer():
    """A word-level PreTrainedTokenizerFast trained on the corpus' words, with UNK and EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]")


def tiny_llama(vocab_size: int, seed: int = 0, context: int = 64):
    """2 decoder layers, hidden 16, grouped-query attention: every linear's input width is a multiple of 4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a spread of logits, so the perplexity is far from the vocabulary size
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok))


def explicit_perplexity(model, ids: list[int], seq_len: int, windows: int) -> float:
    """exp of the mean of -log p(token | prefix), written out: log-softmax by hand in float64."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            x = torch.tensor(ids[w * seq_len:(w + 1) * seq_len])
            logits = model(x[None]).logits[0].double()
            for t in range(seq_len - 1):
                row = logits[t]
                logp = row[x[t + 1]] - (row - row.max()).exp().sum().log() - row.max()
                nll -= float(logp)
                count += 1
    return math.exp(nll / count)


def test_perplexity_matches_explicit_computation(model, tok):
    txt = corpus()
    ids = tok(txt, add_special_tokens=False)["input_ids"]
    seq_len = 16
    got = bs.text.perplexity(model, tok, bstext.Text(txt), seq_len=seq_len, max_windows=5)
    want = explicit_perplexity(model, ids, seq_len, 5)
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(math.log(got) - math.log(len(tok))) > 0.5  # far from a uniform model: the test is sensitive
    # every full window when max_windows is None
    full = bstext.perplexity_of_ids(model, torch.tensor(ids), seq_len)
    assert full["windows"] == len(ids) // seq_len and full["tokens"] == full["windows"] * (seq_len - 1)
    assert full["perplexity"] != pytest.approx(got, rel=1e-6)


def test_perplexity_leaves_model_as_it_was(tok):
    model = tiny_llama(len(tok)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bs.text.perplexity(model, tok, bstext.Text(corpus(200)), seq_len=8, max_windows=2)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_calibration_windows_are_random_slices_reproducible_by_seed(tok):
    txt = corpus()
    stream = tok(txt, add_special_tokens=False)["input_ids"]
    a = bs.text.calibration(tok, bstext.Text(txt), num_samples=10, seq_len=16, seed=0)
    assert a.dtype == torch.long and a.shape == (10, 16)
    assert torch.equal(a, bs.text.calibration(tok, bstext.Text(txt), num_samples=10, seq_len=16, seed=0))
    assert not torch.equal(a, bs.text.calibration(tok, bstext.Text(txt), num_samples=10, seq_len=16, seed=1))
    starts = []
    for row in a.tolist():  # each row is a contiguous slice of the token stream
        hits = [s for s in range(len(stream) - 15) if stream[s:s + 16] == row]
        assert hits
        starts.append(hits[0])
    starts.sort()
    assert all(b - a_ >= 16 for a_, b in zip(starts, starts[1:]))  # no two windows overlap


def test_text_sources(tmp_path, tok):
    f = tmp_path / "novel.txt"
    f.write_text("the lady said . the gentleman said .", encoding="utf-8")
    from_file = bstext.tokenize(tok, str(f)).tolist()
    assert from_file == tok("the lady said . the gentleman said .", add_special_tokens=False)["input_ids"]
    assert bstext.tokenize(tok, f).tolist() == from_file  # a Path
    # a list: documents joined by EOS
    joined = bstext.tokenize(tok, [f, "very much"]).tolist()
    assert joined == from_file + [tok.eos_token_id] + tok("very much", add_special_tokens=False)["input_ids"]
    # a string naming an existing file is the file; Text(...) keeps it literal
    assert bstext.read_documents(bstext.Text(str(f))) == [str(f)]
    with pytest.raises(bs.BrainsurgeonError, match="looks like a file name"):
        bstext.read_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(bs.BrainsurgeonError, match="does not exist"):
        bstext.read_documents(tmp_path / "missing.txt")
    with pytest.raises(bs.BrainsurgeonError, match="empty list"):
        bstext.read_documents([])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(bs.BrainsurgeonError, match="not UTF-8"):
        bstext.read_documents(bad)


def test_bad_input_is_one_line_error(model, tok):
    with pytest.raises(bs.BrainsurgeonError, match="fewer than num_samples x seq_len") as e:
        bs.text.calibration(tok, bstext.Text(corpus(100)), num_samples=10, seq_len=16, seed=0)
    assert "\n" not in str(e.value)
    with pytest.raises(bs.BrainsurgeonError, match="seq_len must be a positive integer"):
        bs.text.calibration(tok, bstext.Text(corpus(100)), num_samples=1, seq_len=0, seed=0)
    with pytest.raises(bs.BrainsurgeonError, match="exceeds the model's context of 64"):
        bs.text.perplexity(model, tok, bstext.Text(corpus()), seq_len=65)
    with pytest.raises(bs.BrainsurgeonError, match="fewer than one window"):
        bs.text.perplexity(model, tok, bstext.Text("the lady"), seq_len=16)
    small = tiny_llama(len(tok) - 3)  # a model whose vocabulary is smaller than the tokenizer's
    with pytest.raises(bs.BrainsurgeonError, match="do not belong together"):
        bs.text.perplexity(small, tok, bstext.Text(corpus()), seq_len=16)
    with pytest.raises(bs.BrainsurgeonError, match="outside the model's vocabulary"):
        bstext.perplexity_of_ids(small, torch.tensor([len(tok) - 1] * 16), seq_len=16)
