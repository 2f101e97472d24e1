"""Incremental detokenizing (no broken characters), stop strings across delta boundaries, the reference's strip()."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from ivl_llm.decoding import IncrementalDetokenizer, ReplyStripper, StopStringMatcher


def stream(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    return deltas, detok.flush()


def test_chinese_split_over_byte_tokens_never_shows_half_a_character(internlm2_tokenizer):
    text = "书生·浦语 says 你好世界, then 🙂 hello"
    ids = internlm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    partial = [internlm2_tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in partial)  # the tokenizer really splits characters
    deltas, tail = stream(internlm2_tokenizer, ids)
    assert "".join(deltas) + tail == text
    assert all("\ufffd" not in d for d in deltas)
    assert tail == ""


def test_special_tokens_are_not_shown(internlm2_tokenizer):
    ids = internlm2_tokenizer("ab<|im_end|>cd", add_special_tokens=False)["input_ids"]
    deltas, tail = stream(internlm2_tokenizer, ids)
    assert "".join(deltas) + tail == "abcd"


def test_an_incomplete_character_at_the_end_is_flushed(internlm2_tokenizer):
    ids = internlm2_tokenizer("好浦", add_special_tokens=False)["input_ids"]
    deltas, tail = stream(internlm2_tokenizer, ids[:-1])
    assert "".join(deltas) + tail == internlm2_tokenizer.decode(ids[:-1])


def feed_all(matcher: StopStringMatcher, chunks: list[str]) -> str:
    out = "".join(matcher.feed(c) for c in chunks)
    return out + matcher.flush()


def test_stop_string_split_over_chunks_is_found_and_cut():
    matcher = StopStringMatcher(["END"])
    assert feed_all(matcher, ["hello E", "N", "D and more"]) == "hello "
    assert matcher.stopped


def test_prefix_of_a_stop_string_is_held_then_released():
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("a #") == "a "
    assert matcher.feed("#b") == "##b"
    assert not matcher.stopped


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(["zz", "b"])
    assert feed_all(matcher, ["abczz"]) == "a"


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abXY#", max_size=40),
    stop=st.text(alphabet="abXY#", min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=6),
)
def test_chunking_never_changes_the_result(text, stop, cuts):
    chunks, last = [], 0
    for cut in sorted(set(cuts)):
        chunks.append(text[last:cut])
        last = max(last, cut)
    chunks.append(text[last:])
    index = text.find(stop)
    expected = text if index < 0 else text[:index]
    assert feed_all(StopStringMatcher([stop]), chunks) == expected


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet=" \n\tab\u3000好", max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=8),
)
def test_streamed_reply_is_exactly_the_stripped_reply_and_never_ends_in_whitespace(text, cuts):
    chunks, last = [], 0
    for cut in sorted(set(cuts)):
        chunks.append(text[last:cut])
        last = max(last, cut)
    chunks.append(text[last:])
    stripper = ReplyStripper()
    deltas = [d for d in (stripper.feed(c) for c in chunks) if d]
    assert "".join(deltas) == text.strip()  # the reference's response.strip(), str.isspace() included
    assert all(d.strip() for d in deltas)  # no whitespace-only delta
    assert not deltas or deltas[-1] == deltas[-1].rstrip()
