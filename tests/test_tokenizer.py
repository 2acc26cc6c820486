"""stemref's CLIP tokenizer against transformers' `CLIPTokenizer` (what diffusers uses for SD1.5), plus a toy
vocabulary whose BPE result is worked out by hand, and the error paths of `from_folder`."""
from __future__ import annotations

import hashlib
import json
import unicodedata

import pytest
import torch
from clip_vocab import write_clip_tokenizer_files

from stemref.tokenizer import CLIPTokenizer, TokenizerFilesError

LONG = ("a majestic white horse galloping along a misty beach at sunrise, waves crashing, golden light, "
        "highly detailed, 8k, photorealistic, cinematic composition, by a famous photographer, trending on "
        "artstation, sharp focus, volumetric fog, dramatic sky with pink and orange clouds, seagulls flying "
        "overhead, sand flying from its hooves, long flowing mane, reflections in the wet sand, a lighthouse "
        "in the distance, and a small boat on the horizon under a crescent moon")

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "a horse, a rider; a dog: running!",
    "horse,rider.dog",
    "the price is $19.99 (was €25,50) on 2023-11-24 at 10:30am",
    "1234567890 and 3.14159",
    "it's the dog's bone, don't they're we've I'm you'll he'd",
    "IT'S DON'T THEY'RE",
    "'''s ''t rock'n'roll",
    "'ſ is a long s",
    "café crème brûlée naïve résumé",
    unicodedata.normalize("NFD", "café crème brûlée naïve résumé"),
    "e\u0301 a\u0300 \u0301alone",
    "İstanbul straße ΟΔΟΣ ΣΑΣ",
    "猫の写真、東京の夜景",
    "고양이 사진 서울",
    "кошка на крыше, Москва",
    "γάτα στη στέγη",
    "قطة على السطح",
    "एक बिल्ली की तस्वीर",
    "x² + y² = z², ½ cup, ¾ inch",
    "chapter Ⅻ and Ⅳ, ① ② ③",
    "arabic-indic ٠١٢٣٤٥٦٧٨٩ and devanagari ०१२",
    "a cat 🐱 with a dog 🐶!!",
    "family 👨‍👩‍👧‍👦 and flags 🇯🇵 and 👍🏽",
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cform",
    "   leading and trailing spaces   ",
    "",
    "   ",
    "see https://example.com/path?q=1&b=two#frag for details",
    "a <|endoftext|> in the middle",
    "<|startoftext|>start and end<|endoftext|>",
    "!<|endoftext|>! and x<|startoftext|>y",
    "<|EndOfText|>! spelled in another case <|STARTOFTEXT|>",
    "a (red:1.2) car, ((masterpiece)), [blurry:0.8]",
    "snake_case-and-kebab/slash\\backslash @user #tag 100%",
    "non\xa0breaking\u3000ideographic\u2028line\x85nel",
    "file\x1cseparator\x1funit and zero\u200bwidth\u180emongolian",
    "ﬁne ligature and ｆｕｌｌｗｉｄｔｈ text",
    "“curly quotes” — em dash – en dash … ellipsis",
    "ǅemal Ǆ title-case digraphs",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    LONG,
    LONG + " " + LONG,
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_clip_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def ours(folder):
    return CLIPTokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    return HFCLIPTokenizer.from_pretrained(folder, model_max_length=77)


def hf_ids(hf, prompts: list[str]) -> torch.Tensor:
    return hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_prompt_list_is_varied_and_long_enough(hf):
    assert len(PROMPTS) >= 40
    assert len(hf(LONG, add_special_tokens=False).input_ids) > 75  # the truncation cases really truncate


def test_matches_transformers_on_a_batch(ours, hf):
    got = ours(PROMPTS)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), 77)
    torch.testing.assert_close(got, hf_ids(hf, PROMPTS), rtol=0, atol=0)


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_unpadded_ids_match_transformers(ours, hf, prompt):
    """Per prompt, without the 77 cap, so a difference late in a long prompt is not cut away."""
    assert ours.encode(prompt) == hf(prompt, add_special_tokens=False).input_ids
    assert ours.token_count(prompt) == len(hf(prompt, add_special_tokens=False).input_ids)


def test_published_ids(ours):
    # "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407] with OpenAI's and HF's tokenizers.
    assert ours.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    row = ours("a photo of a cat")
    assert row.shape == (1, 77)
    assert row[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert row[0, 7:].tolist() == [49407] * 70
    assert (ours.start_id, ours.end_id, ours.pad_id) == (49406, 49407, 49407)


def test_truncation_keeps_the_end_token(ours):
    ids = ours.encode(LONG)
    assert len(ids) > 75
    row = ours(LONG)[0].tolist()
    assert row == [49406, *ids[:75], 49407]


def test_string_and_list_give_the_same_rows(ours):
    assert torch.equal(ours("a cat"), ours(["a cat"]))
    assert torch.equal(ours(("a cat", "a dog"))[1], ours("a dog")[0])


def write_toy(folder, vocab: dict[str, int], merges: list[str]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def toy_vocab(extra: list[str]) -> dict[str, int]:
    """Every byte symbol with and without </w> (taken from the real vocabulary's first 512 entries), the merge
    results, and the two special tokens."""
    from clip_vocab import byte_characters

    chars = byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + extra + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def test_bpe_merge_order_on_a_toy_vocabulary(tmp_path):
    # Worked by hand. Ranks: (a b)=0, (a b</w>)=1, (ab ab</w>)=2, (b a)=3.
    #   "abab" = a b a b</w> -> (a b): ab a b</w> -> (a b</w>): ab ab</w> -> (ab ab</w>): abab</w>
    #   "bab"  = b a b</w>   -> (a b</w>) outranks (b a), although (b a) comes first in the word: b ab</w>
    #   "ba"   = b a</w>     -> no rule for (b a</w>): stays b a</w>
    merges = ["a b", "a b</w>", "ab ab</w>", "b a"]
    vocab = toy_vocab(["ab", "ab</w>", "abab</w>", "ba"])
    tok = CLIPTokenizer.from_folder(write_toy(tmp_path / "toy", vocab, merges), max_length=8)
    assert tok.bpe("abab") == ("abab</w>",)
    assert tok.bpe("bab") == ("b", "ab</w>")
    assert tok.bpe("ba") == ("b", "a</w>")
    assert tok.encode("ABAB ba") == [vocab["abab</w>"], vocab["b"], vocab["a</w>"]]
    assert tok("abab").tolist() == [[vocab["<|startoftext|>"], vocab["abab</w>"]] + [vocab["<|endoftext|>"]] * 6]


def test_bpe_merges_every_occurrence_of_the_best_pair():
    # Ranks: (a a)=0, (a a</w>)=1, (aa aa</w>)=2.
    #   "aaaa"  = a a a a</w>   -> (a a) left to right: aa a a</w> -> aa aa</w> -> aaaa</w>
    #   "aaaaa" = a a a a a</w> -> (a a) twice in one step: aa aa a</w>; no rule for (aa aa) or (aa a</w>)
    merges = [("a", "a"), ("a", "a</w>"), ("aa", "aa</w>")]
    vocab = toy_vocab(["aa", "aa</w>", "aaaa</w>"])
    tok = CLIPTokenizer(vocab, merges)
    assert tok.bpe("aaaa") == ("aaaa</w>",)
    assert tok.bpe("aaaaa") == ("aa", "aa", "a</w>")


def test_toy_vocabulary_matches_transformers():
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    merges = [("a", "b"), ("a", "b</w>"), ("ab", "ab</w>"), ("b", "a"), ("a", "a"), ("a", "a</w>"), ("aa", "aa</w>")]
    vocab = toy_vocab(["ab", "ab</w>", "abab</w>", "ba", "aa", "aa</w>", "aaaa</w>"])
    text = "abab bab ba aaaa aaaaa baab, aba!"
    hf = HFCLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    assert CLIPTokenizer(vocab, merges).encode(text) == hf(text, add_special_tokens=False).input_ids


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerFilesError, match="tokenizer folder not found.*vocab.json and merges.txt"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")


def test_missing_files_are_named(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerFilesError, match="lacks merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").unlink()
    with pytest.raises(TokenizerFilesError, match="lacks vocab.json and merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)


def test_malformed_files_are_clear_errors(tmp_path, folder):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "merges.txt").write_text((folder / "merges.txt").read_text(encoding="utf-8"), encoding="utf-8")
    (bad / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerFilesError, match="cannot read the vocabulary"):
        CLIPTokenizer.from_folder(bad)
    (bad / "vocab.json").write_text(json.dumps({"a": 0}), encoding="utf-8")
    with pytest.raises(TokenizerFilesError, match="no <\\|startoftext\\|> token"):
        CLIPTokenizer.from_folder(bad)
    (bad / "vocab.json").write_text((folder / "vocab.json").read_text(encoding="utf-8"), encoding="utf-8")
    (bad / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(TokenizerFilesError, match="line 2 is not two symbols"):
        CLIPTokenizer.from_folder(bad)
    (bad / "merges.txt").write_text("#version: 0.2\nq zzz\n", encoding="utf-8")
    with pytest.raises(TokenizerFilesError, match="do not belong together"):
        CLIPTokenizer.from_folder(bad)


def test_bad_prompts_are_refused(ours):
    with pytest.raises(TypeError, match="str"):
        ours(None)
    with pytest.raises(TypeError, match="non-empty list"):
        ours([])
    with pytest.raises(TypeError, match="str"):
        ours.encode(3)


def test_shipped_openai_vocabulary_equals_sd15_files(tmp_path):
    """CLIPTokenizer.openai() reads the gz inside the package; it must equal SD1.5's derived vocab.json/merges.txt."""
    from stemref.tokenizer import OPENAI_BPE

    assert hashlib.sha256(OPENAI_BPE.read_bytes()).hexdigest() == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    shipped, files = CLIPTokenizer.openai(), CLIPTokenizer.from_folder(write_clip_tokenizer_files(tmp_path))
    assert shipped.vocab == files.vocab and shipped.ranks == files.ranks
    assert len(shipped.vocab) == 49408
