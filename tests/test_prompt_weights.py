"""The prompt weight parser: the same pieces as the plain recursive definition, in linear time and
without recursion whatever the nesting, and weights that would wreck the conditioning refused."""

import math
import random

import pytest

from wuerstchen.text.tokenizer import PROMPT_WEIGHT_LIMIT, parse_prompt_weights, split_embedding_refs

CLOSE = {"(": ")", "[": "]"}


def reference(text, weight=1.0):
    """ComfyUI's grammar as a direct recursive definition (quadratic, shallow inputs only).

    A bracket opens a group when a closer of its kind brings its depth back to zero; ``(x)``
    multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:w)`` sets w when the text after the last
    colon is a number.
    """
    out, literal, i = [], "", 0
    while i < len(text):
        char, close = text[i], -1
        if char in CLOSE:
            depth = 0
            for j in range(i, len(text)):
                depth += (text[j] == char) - (text[j] == CLOSE[char])
                if depth == 0:
                    close = j
                    break
        if close < 0:
            literal += char
            i += 1
            continue
        if literal:
            out.append((literal, weight))
            literal = ""
        inner, inner_weight = text[i + 1:close], weight * 1.1 if char == "(" else weight / 1.1
        colon = inner.rfind(":")
        if char == "(" and colon > 0:
            try:
                inner_weight, inner = float(inner[colon + 1:]), inner[:colon]
            except ValueError:
                pass
        out += reference(inner, inner_weight)
        i = close + 1
    if literal:
        out.append((literal, weight))
    return out


def test_same_pieces_as_the_recursive_definition():
    rng = random.Random(0)
    alphabet = "ab ()[]:1.5"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        assert parse_prompt_weights(text) == reference(text), text


def test_32000_open_brackets_parse_in_one_pass():
    text = "(" * 32000  # a quadratic scan of this takes tens of seconds
    assert parse_prompt_weights(text) == [(text, 1.0)]
    text = "(" * 16000 + "cat" + "[" * 16000
    assert parse_prompt_weights(text) == [(text, 1.0)]


def test_deep_nesting_needs_no_recursion():
    assert parse_prompt_weights("(" * 20000 + ")" * 20000) == []  # nothing to weight
    pieces = parse_prompt_weights("[" * 1000 + "a" + "]" * 1000)
    expected = 1.0
    for _ in range(1000):
        expected /= 1.1
    assert pieces == [("a", expected)]
    assert parse_prompt_weights("([" * 1000 + "a" + "])" * 1000) == [("a", pytest.approx(1.0))]
    with pytest.raises(ValueError, match=r"prompt weight .* of 'a' is out of range"):
        parse_prompt_weights("(" * 1000 + "a" + ")" * 1000)  # 1.1 ** 1000: refused, not a RecursionError


@pytest.mark.parametrize("text", ["(a:nan)", "(a:inf)", "(a:-inf)", "(a:Infinity)", "x ((b:NaN) c)"])
def test_non_finite_weights_are_refused(text):
    with pytest.raises(ValueError, match="is not a finite number"):
        parse_prompt_weights(text)


@pytest.mark.parametrize("text", ["(a:1e30)", "(a:-101)", "(" * 49 + "a" + ")" * 49])
def test_huge_weights_are_refused(text):
    with pytest.raises(ValueError, match=f"within ±{PROMPT_WEIGHT_LIMIT:g}"):
        parse_prompt_weights(text)


def test_weights_inside_the_limit_and_non_numbers_still_work():
    assert parse_prompt_weights("(a:100) (b:-3)") == [("a", 100.0), (" ", 1.0), ("b", -3.0)]
    assert parse_prompt_weights("(a:" + "9" * 80 + ")") == [("a:" + "9" * 80, pytest.approx(1.1))]


def test_embedding_references():
    assert split_embedding_refs("a embedding:cat, embedding:dog:1.2 b") == [
        "a ", ("cat", None), ", ", ("dog", 1.2), " b"]
    assert split_embedding_refs("embedding:sub/x.pt") == [("sub/x.pt", None)]
    assert split_embedding_refs("myembedding:x and embedding: x") == ["myembedding:x and embedding: x"]
    for bad, message in (("embedding:x:nan", "not a finite number"), ("embedding:x:abc", "is not a weight"),
                         ("embedding:x:1e9", "out of range")):
        with pytest.raises(ValueError, match=message):
            split_embedding_refs(bad)
    assert math.isclose(parse_prompt_weights("(embedding:x:1.5)")[0][1], 1.5)
