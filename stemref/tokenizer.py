"""CLIP's byte-level BPE tokenizer, the one SD1.5's text encoder was trained with; standard library only.

A prompt becomes ids the way transformers 5.x's `CLIPTokenizer` (and so diffusers) does it:

1. literal `<|startoftext|>` / `<|endoftext|>` in the raw text become their special ids, and the text
   between them is tokenized piece by piece;
2. normalize: Unicode NFC, each whitespace run to one space, lower-case character by character
   (no ftfy and no HTML unescaping, which OpenAI's original tokenizer applied and transformers 5 does not);
3. split into words with CLIP's pattern
   `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`
   (a hand-written scanner over `unicodedata` categories: L* are letters, N* are numbers);
4. write each word's UTF-8 bytes as printable characters (`bytes_to_unicode`), mark its last symbol with
   `</w>`, and merge adjacent symbols in the order of `merges.txt` (byte-pair encoding);
5. look the merged symbols up in `vocab.json`.

`__call__` wraps the ids as `[SOT] + ids + [EOT]`, keeps at most 75 ids so that EOT survives truncation,
and pads with EOT to 77, because SD1.5 conditions on all 77 hidden states and was trained with EOT padding.

Tensor legend: B prompts, L = max_length (77 for SD1.5).
"""
from __future__ import annotations

import functools
import gzip
import json
import re
import unicodedata
from pathlib import Path

import torch

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# transformers' regex engine (Oniguruma) counts these as \s; Python's str.isspace would add U+001C..U+001F.
WHITESPACE_CONTROLS = frozenset("\t\n\v\f\r\x85")
SPECIALS_PATTERN = re.compile(f"({re.escape(START_TOKEN)}|{re.escape(END_TOKEN)})")
OPENAI_BPE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
OPENAI_MERGES = 48_894  # 49,408 tokens = 256 bytes + 256 bytes with </w> + merges + 2 specials
SD15_HINT = "Use the tokenizer/ folder of an SD1.5 checkpoint (it holds vocab.json and merges.txt)."


class TokenizerFilesError(ValueError):
    """The vocabulary files are missing, unreadable or malformed."""


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character. Printable Latin-1 bytes stand for themselves; the 68 others (controls,
    space, soft hyphen) take the code points 256, 257, … in byte order, so that every BPE symbol is visible
    text and a space can never hide inside one."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in mapping)
    mapping.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return mapping


def is_whitespace(char: str) -> bool:
    return char in WHITESPACE_CONTROLS or unicodedata.category(char) in ("Zs", "Zl", "Zp")


def is_letter(char: str) -> bool:
    return unicodedata.category(char).startswith("L")


def is_number(char: str) -> bool:
    return unicodedata.category(char).startswith("N")


def normalize(text: str) -> str:
    """NFC, whitespace runs -> " ", then lower-case each character on its own: like the Rust normalizer,
    and unlike `str.lower()`, a word-final capital sigma becomes σ, not ς."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if is_whitespace(c) else c for c in text)
    text = re.sub(" +", " ", text).strip(" ")
    return "".join(c.lower() for c in text)


def split_words(text: str) -> list[str]:
    """CLIP's pre-tokenizer pattern as a scanner: at each position the first alternative that matches wins,
    runs are greedy, whitespace only separates. Text is already lower-case, so the pattern's IGNORECASE has
    nothing left to do (transformers does not set it either)."""
    words = []
    i = 0
    while i < len(text):
        char = text[i]
        if is_whitespace(char):
            i += 1
            continue
        special = next((s for s in (START_TOKEN, END_TOKEN) if text.startswith(s, i)), None)
        if special is not None:
            # Only a special token spelled in another case (`<|EndOfText|>`) reaches here, literal ones were
            # split off before normalizing. transformers' byte-level step re-splits such a match with
            # GPT-2's pattern, which gives these three words.
            words += ["<|", special[2:-2], "|>"]
            i += len(special)
            continue
        contraction = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
        if contraction is not None:
            end = i + len(contraction)
        elif is_letter(char):
            end = i + 1
            while end < len(text) and is_letter(text[end]):
                end += 1
        elif is_number(char):
            end = i + 1  # each digit is its own word
        else:
            end = i + 1
            while end < len(text) and not (is_whitespace(text[end]) or is_letter(text[end]) or is_number(text[end])):
                end += 1
        words.append(text[i:end])
        i = end
    return words


class CLIPTokenizer:
    """Prompts -> CLIP token ids, identical to transformers' `CLIPTokenizer` with SD1.5's settings."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = 77):
        for token in (START_TOKEN, END_TOKEN):
            if token not in vocab:
                raise TokenizerFilesError(f"the vocabulary has no {token} token; it is not CLIP's. {SD15_HINT}")
        self.byte_chars = bytes_to_unicode()
        missing = [c for ch in self.byte_chars.values() for c in (ch, ch + END_OF_WORD) if c not in vocab]
        if missing:
            raise TokenizerFilesError(f"the vocabulary lacks {len(missing)} byte-level symbols (e.g. {missing[0]!r}); "
                                      f"it is not a byte-level BPE vocabulary. {SD15_HINT}")
        unknown = [a + b for a, b in merges if a + b not in vocab]
        if unknown:
            raise TokenizerFilesError(f"{len(unknown)} merges make symbols missing from the vocabulary "
                                      f"(e.g. {unknown[0]!r}); vocab.json and merges.txt do not belong together.")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for the start and end tokens; use 77 for SD1.5")
        self.vocab = vocab
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.max_length = max_length
        self.start_id = vocab[START_TOKEN]
        self.end_id = vocab[END_TOKEN]
        self.pad_id = self.end_id  # SD1.5 pads with <|endoftext|>; OpenAI's CLIP padded with 0
        # Per instance, so the cache dies with the tokenizer; prompts repeat words a lot.
        self.bpe = functools.lru_cache(maxsize=65_536)(self._bpe)

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int = 77) -> CLIPTokenizer:
        """Read `vocab.json` and `merges.txt` (its `#version` header skipped) from a tokenizer/ folder."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise TokenizerFilesError(f"tokenizer folder not found: {folder}. {SD15_HINT}")
        files = {name: folder / name for name in ("vocab.json", "merges.txt")}
        absent = [name for name, file in files.items() if not file.is_file()]
        if absent:
            raise TokenizerFilesError(f"{folder} lacks {' and '.join(absent)}. {SD15_HINT}")
        try:
            vocab = json.loads(files["vocab.json"].read_text(encoding="utf-8"))
            lines = files["merges.txt"].read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerFilesError(f"cannot read the vocabulary in {folder}: {e}. {SD15_HINT}") from e
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise TokenizerFilesError(f"{files['vocab.json']} is not a token -> id mapping. {SD15_HINT}")
        merges = []
        for number, line in enumerate(lines, start=1):
            if (number == 1 and line.startswith("#version")) or not line.strip():
                continue
            pair = line.split()
            if len(pair) != 2:
                raise TokenizerFilesError(f"{files['merges.txt']} line {number} is not two symbols: {line!r}. {SD15_HINT}")
            merges.append((pair[0], pair[1]))
        return cls(vocab, merges, max_length)

    @classmethod
    def openai(cls, max_length: int = 77) -> CLIPTokenizer:
        """The vocabulary that ships with stemref: OpenAI's BPE file, from which SD1.5's files were made.

        Line 0 of the file is a header and the next 48,894 lines are the merges in rank order; the vocabulary
        is the byte symbols, the byte symbols ending a word, one token per merge, and the two specials.
        """
        with gzip.open(OPENAI_BPE, "rt", encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1 : 1 + OPENAI_MERGES]]
        chars = list(bytes_to_unicode().values())
        tokens = [*chars, *(c + END_OF_WORD for c in chars), *("".join(m) for m in merges), START_TOKEN, END_TOKEN]
        return cls({token: i for i, token in enumerate(tokens)}, merges, max_length)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Byte-level word -> BPE symbols: repeatedly merge every occurrence of the adjacent pair whose merge
        was learned first, until no adjacent pair has a merge."""
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without the start/end tokens that `__call__` adds."""
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}")
        ids = []
        for piece in SPECIALS_PATTERN.split(text):  # odd positions hold the literal special tokens
            if piece in (START_TOKEN, END_TOKEN):
                ids.append(self.vocab[piece])
                continue
            for word in split_words(normalize(piece)):
                byte_word = "".join(self.byte_chars[b] for b in word.encode("utf-8"))
                ids += [self.vocab[symbol] for symbol in self.bpe(byte_word)]
        return ids

    def token_count(self, text: str) -> int:
        """Number of ids `text` takes without the start/end tokens; over max_length - 2, `__call__` truncates."""
        return len(self.encode(text))

    def refuse_long(self, prompts: list[str]) -> None:
        """Raise ValueError for a prompt longer than CLIP reads (max_length - 2 ids), rather than cut it silently."""
        limit = self.max_length - 2
        for p in prompts:
            n = self.token_count(p)
            if n > limit:
                raise ValueError(f"prompt is {n} tokens long; CLIP reads at most {limit}. Shorten it: {p[:60]!r}…")

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompt(s) -> (B, L) int64 ids: [SOT] + first L-2 ids + [EOT], padded with EOT."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a str or a non-empty list of str")
        rows = []
        for prompt in prompts:
            ids = [self.start_id, *self.encode(prompt)[: self.max_length - 2], self.end_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)  # (B, L)
