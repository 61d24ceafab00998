"""Stop strings: the incremental matcher against a brute-force reference, and its cost per step."""

from __future__ import annotations

import random

from layerserve.engine.stop import StopStringMatcher


def reference(text: str, new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest-starting stop string that ends inside the last `new_chars` characters."""
    best = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        at = text.find(stop, start)
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    return best


def reference_held(text: str, stops: list[str]) -> int:
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


def test_matches_the_reference_on_random_streams():
    rng = random.Random(0)
    checked = 0
    for trial in range(400):
        alphabet = "ab" if trial % 2 else "abc"
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        matcher, text = StopStringMatcher(stops), ""
        for _ in range(30):
            piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            hit = matcher.feed(len(text), piece)
            text += piece
            assert hit == reference(text, len(piece), stops), (stops, text)
            if hit is not None:
                checked += 1
                break
            assert matcher.held() == reference_held(text, stops), (stops, text)
    assert checked >= 200  # most random walks reached a stop string


def test_cost_per_piece_does_not_grow_with_the_text():
    """Four 1,024-character stop strings that almost match everywhere (the worst case for the old
    rescan: every step re-sliced each stop string, O(len(stop)^2))."""
    stops = ["a" * 1023 + "b", "a" * 1023 + "c", "ab" * 512, "x" * 1024]
    matcher = StopStringMatcher(stops)
    text_len, costs = 0, []
    for step in range(6000):
        before = matcher.steps
        piece = "aaaa"
        assert matcher.feed(text_len, piece) is None
        text_len += len(piece)
        costs.append(matcher.steps - before)
    # amortized KMP: at most 2 transitions per character per stop string, whatever the text length
    assert sum(costs) <= 2 * text_len * len(stops)
    assert max(costs[-1000:]) <= max(costs[:1000]) + 2 * 1024  # late steps cost what early ones did
    assert matcher.held() == 1023  # the text ends in 1,023 a's: held back, it may become a stop string


def test_a_stop_string_split_across_pieces():
    matcher = StopStringMatcher(["Paris", "\n\n"])
    text = ""
    for piece in ["The capital is P", "ar", "is, of course"]:
        hit = matcher.feed(len(text), piece)
        text += piece
        if hit:
            break
    assert hit == (len("The capital is "), "Paris")
