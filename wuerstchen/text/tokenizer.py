"""CLIP BPE tokenizer that reproduces the official Stable Cascade token ids offline.

The official code tokenizes with the Hugging Face *fast* CLIP tokenizer of
laion/CLIP-ViT-bigG-14 (pad token ``!``).  That tokenizer differs from open_clip's in four
ways, all reproduced here on top of open_clip's bundled BPE vocabulary (identical merges):

* ``!``, ``<|startoftext|>`` and ``<|endoftext|>`` are special tokens, cut out of the *raw*
  text before anything else (``!`` -> 0, the pad id; ``Wow!`` -> ``wow``, 0);
* the only text cleaning is NFC, collapsing whitespace runs to one space and per-character
  lower-casing (no ftfy, no HTML unescaping; word-final ``Σ`` becomes ``σ``);
* the result is ``[49406] + first 75 ids + [49407]``, padded with 0 to 77;
* the attention mask is 1 for BOS, the content and the appended EOS, 0 for the padding.

Würstchen v2's hub tokenizers (``family="v2"``) differ in two ways: they pad with
``<|endoftext|>`` (49407), and ``!`` is an ordinary character there (``!`` -> 256, ``!!`` -> 748).
Everything else, the mask included, is the same.

Words added with :meth:`CLIPTokenizer.add_tokens` behave like Hugging Face ``add_tokens``
(non-special, matched on the normalised text) and get ids from 49408 on, in insertion order.
:func:`parse_prompt_weights` reads ComfyUI's emphasis syntax; the text encoder applies it.
"""

from __future__ import annotations

import gzip
import importlib.util
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import regex
import torch

BOS_ID = 49406
EOS_ID = 49407
PAD_ID = 0
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
MAX_CONTENT_TOKENS = CONTEXT_LENGTH - 2

_SPECIAL_IDS = {"!": PAD_ID, "<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}
_SPECIAL_SPLIT = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>|!)")


@dataclass(frozen=True)
class TokenizerFamily:
    """What differs between the tokenizers of the model families: the pad id and the special strings
    cut out of the raw text before normalisation."""

    name: str
    pad_id: int
    special_ids: dict
    special_split: regex.Pattern


TOKENIZER_FAMILIES = {
    # Stable Cascade (Würstchen v3): laion bigG tokenizer, pad token "!".
    "v3": TokenizerFamily("v3", PAD_ID, _SPECIAL_IDS, _SPECIAL_SPLIT),
    # Würstchen v2 hub tokenizers: pad token <|endoftext|>, "!" is plain text.
    "v2": TokenizerFamily("v2", EOS_ID, {"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID},
                          regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")),
}


def tokenizer_family(family: str) -> TokenizerFamily:
    try:
        return TOKENIZER_FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown tokenizer family {family!r}; choose one of {sorted(TOKENIZER_FAMILIES)}") from None


_WHITESPACE_RUN = regex.compile(r"\p{White_Space}+")
# The CLIP pre-tokenizer pattern as the fast tokenizer applies it (no IGNORECASE; Unicode
# White_Space rather than Python's wider isspace()).
_PRETOKEN = regex.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\p{White_Space}\p{L}\p{N}]+"
)
_NUM_MERGES = 49152 - 256 - 2


def bundled_bpe_path() -> Path:
    """Path of open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "open_clip_torch is required for the CLIP vocabulary: pip install open_clip_torch"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if path.exists():
            return path
    raise FileNotFoundError(
        "bpe_simple_vocab_16e6.txt.gz is missing from the installed open_clip package; "
        "reinstall open_clip_torch"
    )


def _byte_alphabet() -> tuple[list[str], list[int]]:
    """Byte-level BPE stand-ins: (symbol of each byte value, byte order used by the vocabulary).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes get the characters from
    U+0100 on, in byte order.  The vocabulary lists the printable bytes first.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in set(printable)]
    symbols = [""] * 256
    for b in printable:
        symbols[b] = chr(b)
    for n, b in enumerate(others):
        symbols[b] = chr(0x100 + n)
    return symbols, printable + others


class BPEVocabulary:
    """Immutable CLIP vocabulary: byte alphabet, merge ranks and token -> id table."""

    def __init__(self, path: str | Path | None = None):
        lines = gzip.open(path or bundled_bpe_path()).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        alphabet, vocab_order = _byte_alphabet()
        symbols = [alphabet[b] for b in vocab_order]
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        if len(tokens) != VOCAB_SIZE:
            raise ValueError(f"unexpected CLIP vocabulary size {len(tokens)} (want {VOCAB_SIZE})")
        self.byte_symbols = alphabet
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.token_ids = {token: i for i, token in enumerate(tokens)}
        self.id_tokens = tokens

    def merge(self, word: str) -> list[str]:
        """Apply BPE merges to one pre-token already mapped to byte symbols."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best_rank, best = None, None
            for pair in zip(parts, parts[1:]):
                rank = self.ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts


@lru_cache(maxsize=1)
def default_vocabulary() -> BPEVocabulary:
    """The bundled vocabulary, read once (it is never modified)."""
    return BPEVocabulary()


def normalize_text(text: str) -> str:
    """The official normaliser: NFC, whitespace runs -> one space, per-character lower-case."""
    text = _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(ch.lower() for ch in text)


class CLIPTokenizer:
    """Official-exact CLIP tokenizer; optionally with extra words (see :meth:`add_tokens`).

    ``family`` "v3" (default) is Stable Cascade's tokenizer, "v2" Würstchen v2's (pad 49407, ``!``
    ordinary).
    """

    context_length = CONTEXT_LENGTH

    def __init__(self, vocabulary: BPEVocabulary | None = None, family: str = "v3"):
        self.family = tokenizer_family(family)
        self.pad_id = self.family.pad_id
        self._vocabulary = vocabulary
        self._cache: dict[str, tuple[int, ...]] = {}
        self._added: list[str] = []
        self._added_pattern: regex.Pattern | None = None

    @property
    def vocabulary(self) -> BPEVocabulary:
        if self._vocabulary is None:
            self._vocabulary = default_vocabulary()
        return self._vocabulary

    # ---- added words -------------------------------------------------------------------
    @property
    def added_tokens(self) -> dict[str, int]:
        """Added words (normalised) and their ids."""
        return {word: VOCAB_SIZE + i for i, word in enumerate(self._added)}

    def add_tokens(self, words: Iterable[str]) -> list[int]:
        """Register words as single tokens (ids from 49408 on); returns their ids.

        Words are normalised like the text (so matching ignores case).  A word that is already
        registered keeps its id.  Every word is checked first: on an error nothing is added.
        """
        keys = [self.check_added_word(word) for word in words]
        for key in keys:
            if key not in self._added:
                self._added.append(key)
        self._rebuild_added_pattern()
        return [VOCAB_SIZE + self._added.index(key) for key in keys]

    def remove_tokens(self, words: Iterable[str] | None = None) -> None:
        """Forget the given added words (all when None); later words are renumbered.

        An unknown word raises KeyError before anything is removed.
        """
        if words is None:
            self._added.clear()
        else:
            words = list(words)
            keys = [normalize_text(word) for word in words]
            unknown = [w for w, k in zip(words, keys) if k not in self._added]
            if unknown:
                raise KeyError(f"{unknown[0]!r} is not an added token (added: {self._added})")
            self._added = [w for w in self._added if w not in set(keys)]
        self._rebuild_added_pattern()

    def check_added_word(self, word: str) -> str:
        """The normalised form of a word that can be added; ValueError saying why if it cannot."""
        if not isinstance(word, str):
            raise ValueError(f"added token {word!r} must be a string")
        key = normalize_text(word)
        if not key.strip() or key != key.strip():
            raise ValueError(f"added token {word!r} must be non-empty without outer whitespace")
        if self.family.special_split.search(key):
            raise ValueError(f"added token {word!r} contains a special string "
                             f"({', '.join(repr(k) for k in self.family.special_ids)}), which the tokenizer "
                             "always splits off")
        return key

    def _rebuild_added_pattern(self) -> None:
        if not self._added:
            self._added_pattern = None
            return
        # Longest first, so the leftmost match is also the longest (as the HF trie does).
        alternatives = sorted(self._added, key=len, reverse=True)
        self._added_pattern = regex.compile("(" + "|".join(map(regex.escape, alternatives)) + ")")

    # ---- encoding ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Content ids of ``text``: no BOS/EOS, no truncation."""
        ids: list[int] = []
        special = self.family.special_ids
        for piece in self.family.special_split.split(text):
            if piece in special:
                ids.append(special[piece])
            elif piece:
                self._encode_normalized(normalize_text(piece), ids)
        return ids

    def _encode_normalized(self, text: str, out: list[int]) -> None:
        pieces = self._added_pattern.split(text) if self._added_pattern else [text]
        added = self.added_tokens
        for i, piece in enumerate(pieces):
            if i % 2:  # captured group: an added word
                out.append(added[piece])
                continue
            for pretoken in _PRETOKEN.findall(piece):
                out.extend(self._bpe_ids(pretoken))

    def _bpe_ids(self, pretoken: str) -> tuple[int, ...]:
        cached = self._cache.get(pretoken)
        if cached is None:
            vocab = self.vocabulary
            symbols = "".join(vocab.byte_symbols[b] for b in pretoken.encode("utf-8"))
            cached = tuple(vocab.token_ids[t] for t in vocab.merge(symbols))
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[pretoken] = cached
        return cached

    def decode(self, ids: Sequence[int]) -> str:
        """Readable text for ids (for messages and debugging; added words shown as added)."""
        vocab, added = self.vocabulary, {v: k for k, v in self.added_tokens.items()}
        byte_of = {symbol: b for b, symbol in enumerate(vocab.byte_symbols)}
        out = bytearray()
        for i in map(int, ids):
            if i in added or i in (BOS_ID, EOS_ID):
                out += ((added.get(i) or vocab.id_tokens[i]) + " ").encode("utf-8")
                continue
            token = vocab.id_tokens[i]
            out += bytes(byte_of[c] for c in token.removesuffix("</w>"))
            if token.endswith("</w>"):
                out += b" "
        return out.decode("utf-8", errors="replace").strip()

    def window(self, content_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """BOS + at most 75 content ids + EOS, padded to 77 with the pad id; and the attention mask."""
        ids = [BOS_ID, *content_ids[:MAX_CONTENT_TOKENS], EOS_ID]
        mask = [1] * len(ids) + [0] * (CONTEXT_LENGTH - len(ids))
        return ids + [self.pad_id] * (CONTEXT_LENGTH - len(ids)), mask

    def __call__(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both int64 [B, 77], exactly as the official code."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("tokenize() needs at least one prompt")
        rows = [self.window(self.encode(p)) for p in prompts]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.long)
        return ids, mask


# ---- prompt weights ----------------------------------------------------------------------
# Escaped brackets are swapped for private-use characters while parsing, then restored.
_ESCAPES = {"\\(": "\U000F0001", "\\)": "\U000F0002", "\\[": "\U000F0003", "\\]": "\U000F0004"}
_CLOSERS = {"(": ")", "[": "]"}
# |weight| above this is refused: Stage C's conditioning is far out of its range long before it.
PROMPT_WEIGHT_LIMIT = 100.0
_MAX_NUMBER_CHARS = 64  # longer text after a ':' is never read as a number


def parse_prompt_weights(text: str, protected: Iterable[str] = ()) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` pieces, ComfyUI style.

    ``(x)`` multiplies the weight by 1.1, ``[x]`` divides it by 1.1, ``(x:1.3)`` sets it to 1.3
    (ComfyUI: absolute, not relative to enclosing groups); groups nest.  ``\\(`` ``\\)`` ``\\[``
    ``\\]`` are literal brackets, and so are unmatched ones.  Words in ``protected`` (added
    tokens such as ``[fernando]``) are never read as brackets.  A prompt without brackets comes
    back as the single piece ``[(text, 1.0)]``.

    Linear in the length of the prompt and without recursion, whatever the nesting.  A weight
    that is not a finite number (``(a:nan)``, ``(a:inf)``) or whose size exceeds
    :data:`PROMPT_WEIGHT_LIMIT` (``(a:1e30)``, 50 nested brackets) raises ValueError.
    """
    for escape, placeholder in _ESCAPES.items():
        text = text.replace(escape, placeholder)
    words = sorted({w for w in protected if any(c in w for c in "()[]")}, key=len, reverse=True)
    if words:
        pattern = regex.compile("|".join(map(regex.escape, words)), regex.IGNORECASE)
        text = pattern.sub(lambda m: _escape_brackets(m.group(0)), text)
    pieces = _weighted_pieces(text)
    restore = {placeholder: escape[1] for escape, placeholder in _ESCAPES.items()}
    out = []
    for piece, weight in pieces:
        for placeholder, char in restore.items():
            piece = piece.replace(placeholder, char)
        out.append((piece, weight))
    return out


def _escape_brackets(word: str) -> str:
    for escape, placeholder in _ESCAPES.items():
        word = word.replace(escape[1], placeholder)
    return word


def _bracket_partners(text: str) -> list[int]:
    """For each opening bracket the index of its closing partner (same kind only), else -1.

    One pass with a stack per kind; this is the partner a forward scan counting that kind's
    depth would find, for every opener at once.
    """
    partner = [-1] * len(text)
    open_at: dict[str, list[int]] = {"(": [], "[": []}
    openers = {closer: opener for opener, closer in _CLOSERS.items()}
    for i, char in enumerate(text):
        if char in open_at:
            open_at[char].append(i)
        elif char in openers and open_at[openers[char]]:
            partner[open_at[openers[char]].pop()] = i
    return partner


def _explicit_weight(number: str, group: str) -> float | None:
    """The weight written after the last ':' of a group, None when it is not a number."""
    if len(number) > _MAX_NUMBER_CHARS:
        return None
    try:
        value = float(number)
    except ValueError:
        return None
    if value != value or abs(value) == float("inf"):
        raise ValueError(f"prompt weight {number.strip()!r} in {group[:80]!r} is not a finite number")
    return value


def _weighted_pieces(text: str) -> list[tuple[str, float]]:
    """The bracket grammar, walked with an explicit stack of open groups."""
    partner = _bracket_partners(text)
    last_colon, colon = [], -1
    for i, char in enumerate(text):
        colon = i if char == ":" else colon
        last_colon.append(colon)
    pieces: list[tuple[str, float]] = []
    literal: list[str] = []

    def flush(weight: float) -> None:
        if not literal:
            return
        piece = "".join(literal)
        literal.clear()
        if abs(weight) > PROMPT_WEIGHT_LIMIT:
            raise ValueError(f"prompt weight {weight:.4g} of {piece[:40]!r} is out of range: weights (also "
                             f"from nested brackets, x1.1 each) must lie within ±{PROMPT_WEIGHT_LIMIT:g}")
        pieces.append((piece, weight))

    # Each open group: (where its text ends, where reading resumes after it, its weight).
    stack = [(len(text), len(text), 1.0)]
    i = 0
    while stack:
        end, resume, weight = stack[-1]
        if i >= end:
            flush(weight)
            stack.pop()
            i = resume
            continue
        char = text[i]
        close = partner[i] if char in _CLOSERS else -1
        if close < 0 or close >= end:
            literal.append(char)
            i += 1
            continue
        flush(weight)
        inner_end = close
        if char == "(":
            inner_weight = weight * 1.1
            colon = last_colon[close - 1]
            if colon > i + 1:
                explicit = _explicit_weight(text[colon + 1:close], text[i:close + 1])
                if explicit is not None:
                    inner_weight, inner_end = explicit, colon
        else:
            inner_weight = weight / 1.1
        stack.append((inner_end, close + 1, inner_weight))
        i += 1
    return pieces


# ---- textual-inversion references ---------------------------------------------------------
# ComfyUI's syntax: "embedding:NAME" as a word (NAME up to a space or comma), here also with an
# optional ":WEIGHT"; "(embedding:NAME:1.2)" weights it through the bracket syntax.
_EMBEDDING_REF = regex.compile(r"(?<![^\s,(\[])embedding:([^\s,:]+)(?::([^\s,]*))?")


def split_embedding_refs(text: str) -> list[str | tuple[str, float | None]]:
    """``text`` cut into plain text and ``(name, weight or None)`` for each ``embedding:NAME[:W]``."""
    out: list[str | tuple[str, float | None]] = []
    at = 0
    for m in _EMBEDDING_REF.finditer(text):
        if m.start() > at:
            out.append(text[at:m.start()])
        weight = None
        if m.group(2) is not None:
            number = m.group(2)
            value = _explicit_weight(number, m.group(0)) if number else None
            if value is None:
                raise ValueError(f"{m.group(0)!r}: {number!r} is not a weight; write embedding:NAME or "
                                 "embedding:NAME:1.2")
            if abs(value) > PROMPT_WEIGHT_LIMIT:
                raise ValueError(f"{m.group(0)!r}: weight {value:g} is out of range (±{PROMPT_WEIGHT_LIMIT:g})")
            weight = value
        out.append((m.group(1), weight))
        at = m.end()
    if at < len(text):
        out.append(text[at:])
    return out


@lru_cache(maxsize=None)
def _plain_tokenizer(family: str = "v3") -> CLIPTokenizer:
    return CLIPTokenizer(family=family)


def tokenize(prompts: str | Sequence[str], family: str = "v3") -> tuple[torch.Tensor, torch.Tensor]:
    """Official tokenization, ``(input_ids, attention_mask)``, int64 [B, 77].

    ``family`` "v3": Stable Cascade's ids; "v2": the Würstchen v2 hub tokenizers' ids.
    """
    tokenizer_family(family)  # a clear error before the cache sees an unknown name
    return _plain_tokenizer(family)(prompts)
