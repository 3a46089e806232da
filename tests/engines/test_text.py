"""UTF-8-safe detokenization and stop strings that span tokens."""

from __future__ import annotations

from aicloud.engines.llamacpp.text import StopMatcher, Utf8Stream


def test_split_multibyte_characters_wait_for_their_bytes() -> None:
    data = "한국어 中文 🎉".encode()
    stream = Utf8Stream()
    out = [stream.feed(data[i : i + 1]) for i in range(len(data))]
    assert "".join(out) + stream.flush() == "한국어 中文 🎉"
    assert all("\ufffd" not in piece for piece in out)


def test_truncated_character_becomes_replacement_only_at_the_end() -> None:
    stream = Utf8Stream()
    assert stream.feed("🎉".encode()[:2]) == ""
    assert stream.flush() == "\ufffd"


def test_stop_string_across_pushes_is_cut() -> None:
    m = StopMatcher(("END",))
    assert m.push("hello E") == ("hello ", False)
    assert m.push("N") == ("", False)
    assert m.push("D and more") == ("", True)


def test_partial_stop_prefix_is_released_when_it_diverges() -> None:
    m = StopMatcher(("</s>",))
    assert m.push("a</") == ("a", False)
    assert m.push("b") == ("</b", False)
    assert m.flush() == ""


def test_earliest_of_several_stops_wins() -> None:
    m = StopMatcher(("world", "lo w"))
    assert m.push("hello world") == ("hel", True)


def test_no_stops_passes_everything() -> None:
    m = StopMatcher(())
    assert m.push("abc") == ("abc", False)
