"""Zero-shot sets: each detokenizer on known strings, packing per example, too-short sets, bad input;
the context of each token that generative perplexity scores."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules.base import DataError
from datamodules.tokenizer import load_tokenizer
from datamodules.zeroshot import (ZeroShotDataModule, lambada_detokenize, lm1b_detokenize, ptb_detokenize,
                                  wikitext_detokenize)
from lightning_md4.evaluation import causal_lm_nll
from textdata import documents, train_bpe

SEQ = 16


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json")


# Expected outputs: SEDD's rules (louaaron/Score-Entropy-Discrete-Diffusion, data.py) applied by
# hand, in SEDD's order, quirks included (the comments name the ones that a cleaner detokenizer
# would get "right" and SEDD does not).

@pytest.mark.parametrize("raw, clean", [
    (" = = Early life = = \n", " == Early life ==\n"),
    (" = = = Reception = = = \n", " === Reception ===\n"),
    (" The 1 @,@ 000 @-@ year @-@ old ( approx . 3 @.@ 5 m ) , he said \" hello there \" . \n",
     ' The 1,000-year-old (approx. 3.5 m), he said "hello there".\n'),
    # n't and % stay split off
    ("It 's the band 's first album ; critics were n't sure : 8 % liked it ! \n",
     "It's the band's first album; critics were n't sure: 8 % liked it!\n"),
    (" The game 's battle system , the BliTZ system , is carried over directly from Valkyira Chronicles . \n",
     " The game's battle system, the BliTZ system, is carried over directly from Valkyira Chronicles.\n"),
    (" Temperatures reach 20 \u00b0 C ( 68 \u00b0 F ) in the players ' season . \n",
     " Temperatures reach 20\u00b0C (68\u00b0F) in the players' season.\n"),
    (' He called it " the best game " , and it sold well . \n', ' He called it "the best game", and it sold well.\n'),
])
def test_wikitext(raw, clean):
    assert wikitext_detokenize(raw) == clean


@pytest.mark.parametrize("raw, clean", [
    ("the company 's shares fell N % to $ N a share", "the company's shares fell 1 % to $1 a share"),
    ("mr. <unk> said he does n't expect 1\\/2 of the traders ' profits", "mr. ? said he doesn't expect 1/2 of the traders' profits"),
    ("sales rose N N to $ N million from $ N million", "sales rose 1 1 to $1 million from $1 million"),
    ("N years later mr. <unk> 's firm paid N", "N years later mr. ?'s firm paid N"),  # N at either end stays
    ("it ranked # N among the nation 's banks", "it ranked #1 among the nation's banks"),
])
def test_ptb(raw, clean):
    assert ptb_detokenize(raw) == clean


@pytest.mark.parametrize("raw, clean", [
    ("  \u201cHi,\u201d she said.  ", '\n"Hi," she said.'),
    ("\u201cI\u2019m here,\u201d he said. \u201cGood.\u201d", '\n"I\u2019m here," he said. "Good."'),
])
def test_lambada(raw, clean):
    assert lambada_detokenize(raw) == clean


@pytest.mark.parametrize("raw, clean", [
    # a full stop after a bracket stays apart, n't stays split off
    ('He said : " I do n\'t know ( really ) . "', 'He said: "I do n\'t know (really) ."'),
    ("See http : / / example.com / page ; it costs $ 5 , or \u00a3 4 ?", "See http://example.com/page; it costs $5, or \u00a34?"),
    ("The company said it expects to report a profit of $ 1.2 million , or 5 cents a share .",
     "The company said it expects to report a profit of $1.2 million, or 5 cents a share."),
    ('It \'s " not a problem , " he said .', 'It\'s "not a problem," he said.'),
    ("Why does the ' best ' team lose ?", "Why does the 'best' team lose?"),
    ("U.S. officials said Monday . Others disagreed .", "U.S. officials said Monday. Others disagreed."),
    ("He arrived at 5 p.m . The rest left .", "He arrived at 5 p.m . The rest left."),  # only after a plain word
])
def test_lm1b(raw, clean):
    assert lm1b_detokenize(raw) == clean


def expected_blocks(examples: list[str], tokenizer, seq_len: int) -> np.ndarray:
    stream = []
    for text in examples:
        stream += tokenizer.tokenizer.encode(text).ids + [tokenizer.eos_id]
    full = len(stream) // seq_len
    return np.array(stream[: full * seq_len]).reshape(full, seq_len)


def blocks(dm: ZeroShotDataModule) -> np.ndarray:
    return np.stack([dm.test_set[i]["x0"].numpy() for i in range(len(dm.test_set))])


def make(name: str, path, bpe, tmp_path, seq_len: int = SEQ) -> ZeroShotDataModule:
    dm = ZeroShotDataModule(name, path=str(path), tokenizer=str(bpe), data_dir=str(tmp_path / "cache"),
                            seq_len=seq_len, eval_batch_size=2)
    dm.prepare_data()
    dm.setup("test")
    return dm


def test_wikitext_lines_are_examples_with_newlines_kept(tmp_path, bpe):
    lines = [" = Title = \n", "\n", " the cat @-@ like dog sat , he said . \n", *(d + "\n" for d in documents(20))]
    path = tmp_path / "wiki.train.raw"
    path.write_text("".join(lines))
    dm = make("wikitext2", path, bpe, tmp_path)
    tok = load_tokenizer(str(bpe))
    np.testing.assert_array_equal(blocks(dm), expected_blocks([wikitext_detokenize(x) for x in lines], tok, SEQ))
    assert dm.num_tokens == len(dm.test_set) * SEQ > 0
    batch = next(iter(dm.test_dataloader()))
    assert batch["x0"].shape == (2, SEQ) and batch["index"].tolist() == [0, 1]


def test_ptb_lines_lose_their_newline_and_lambada_reads_jsonl(tmp_path, bpe):
    tok = load_tokenizer(str(bpe))
    sentences = [d.lower() for d in documents(20)]
    (tmp_path / "ptb.test.txt").write_text("".join(s + "\n" for s in sentences))
    dm = make("ptb", tmp_path / "ptb.test.txt", bpe, tmp_path)
    np.testing.assert_array_equal(blocks(dm), expected_blocks([ptb_detokenize(s) for s in sentences], tok, SEQ))
    passages = documents(20, seed=3)
    (tmp_path / "lambada_test.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    dm = make("lambada", tmp_path / "lambada_test.jsonl", bpe, tmp_path)
    np.testing.assert_array_equal(blocks(dm), expected_blocks([lambada_detokenize(p) for p in passages], tok, SEQ))


def test_a_set_shorter_than_one_block_is_an_error(tmp_path, bpe):
    (tmp_path / "short.txt").write_text("the cat sat\n")
    with pytest.raises(DataError, match=r"has \d+ tokens, fewer than one 64-token block"):
        make("lm1b", tmp_path / "short.txt", bpe, tmp_path, seq_len=64)


def test_bad_inputs(tmp_path, bpe):
    with pytest.raises(DataError, match="unknown zero-shot set 'wiki'"):
        ZeroShotDataModule("wiki", path=None, tokenizer=str(bpe))
    with pytest.raises(DataError, match="does not exist"):
        ZeroShotDataModule("ptb", path=str(tmp_path / "missing.txt"), tokenizer=str(bpe))
    (tmp_path / "wiki.raw").write_text("".join(d + "\n" for d in documents(20)))
    dm = make("wikitext103", tmp_path / "wiki.raw", bpe, tmp_path)
    with pytest.raises(DataError, match="evaluation only"):
        dm.train_dataloader()


# -- generative perplexity: the context of each scored token ----------------------------------
# (lightning_md4.evaluation.causal_lm_nll; here because it shares the evaluation protocol)

class ContextCountingLM(torch.nn.Module):
    """A causal LM over ids 0..vocab-1 that predicts ``next = current + 1`` with logit c, c being the
    number of tokens it has read so far in its window: a token scored with c tokens of context
    costs ``log(1 + (vocab - 1) e^{-c})`` nats, so the total tells how much context each token had."""

    def __init__(self, vocab: int, context: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        assert input_ids.shape[1] <= self.config.max_position_embeddings, "window longer than the context"
        seen = attention_mask.cumsum(-1).double()  # [B, W]: tokens read up to and including each position
        logits = torch.zeros(*input_ids.shape, self.vocab, dtype=torch.float64)
        logits.scatter_(-1, (input_ids + 1).clamp(max=self.vocab - 1)[..., None], seen[..., None])
        return SimpleNamespace(logits=logits)


class NumberTokenizer:
    """Text ``"1 2 3"`` is the ids [1, 2, 3]; BOS is 0, so a text "1 2 ... n" counts up from BOS."""

    bos_token_id = eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [int(word) for word in text.split()]}


LM_VOCAB, LM_CONTEXT = 64, 8


def counting_text(n: int) -> str:
    return " ".join(str(i) for i in range(1, n + 1))


def cost(contexts: list[int]) -> float:
    """Nats of the tokens scored with these numbers of context tokens under ContextCountingLM."""
    return sum(math.log1p((LM_VOCAB - 1) * math.exp(-c)) for c in contexts)


def test_generative_perplexity_scores_the_last_token_with_a_full_context():
    """A text one token longer than the context (a 1024-token sample behind its BOS under a
    1024-position scorer): its last token is read with the 7 tokens before it, not 1; a text that
    fits is one pass. Mixed lengths in one batch exercise the padding."""
    lm = ContextCountingLM(LM_VOCAB, LM_CONTEXT)
    texts = [counting_text(5), counting_text(LM_CONTEXT)]  # 6 and 9 tokens with the BOS
    nll, count = causal_lm_nll(texts, lm, NumberTokenizer(), batch_size=2)
    contexts = [1, 2, 3, 4, 5] + [1, 2, 3, 4, 5, 6, 7, 7]
    assert count == len(contexts)
    assert nll == pytest.approx(cost(contexts), rel=1e-12)


@pytest.mark.parametrize("stride, contexts", [
    # windows [0, 8) scores 1..7; [4, 12) scores 8..11; [7, 15) scores 12..14
    (4, [1, 2, 3, 4, 5, 6, 7] + [4, 5, 6, 7] + [5, 6, 7]),
    (1, [1, 2, 3, 4, 5, 6, 7] + [7] * 7),  # every token with all the context there is
    (7, [1, 2, 3, 4, 5, 6, 7] + [1, 2, 3, 4, 5, 6, 7]),  # back to back windows
])
def test_generative_perplexity_sliding_windows(stride, contexts):
    lm = ContextCountingLM(LM_VOCAB, LM_CONTEXT)
    nll, count = causal_lm_nll([counting_text(14)], lm, NumberTokenizer(), batch_size=3, stride=stride)
    assert count == 14 == len(contexts)
    assert nll == pytest.approx(cost(contexts), rel=1e-12)


def test_generative_perplexity_refuses_a_stride_without_overlap():
    for stride in (0, LM_CONTEXT):
        with pytest.raises(ValueError, match="stride must be in"):
            causal_lm_nll([counting_text(20)], ContextCountingLM(LM_VOCAB, LM_CONTEXT), NumberTokenizer(), stride=stride)
