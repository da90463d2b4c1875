"""Stop strings over streamed text: emit what cannot be the start of a stop string, end at the first match."""


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.pending = ""
        self.matched: str | None = None  # the stop string that ended the output

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that is safe to emit now, and whether a stop string ended the output."""
        self.pending += text
        found = [(at, stop) for stop in self.stops if (at := self.pending.find(stop)) >= 0]
        if found:
            at, self.matched = min(found)
            ready, self.pending = self.pending[:at], ""
            return ready, True
        cut = len(self.pending) - held_back(self.pending, self.stops)
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        return ready, False

    def flush(self) -> str:
        ready, self.pending = self.pending, ""
        return ready


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that a stop string starts with."""
    lengths = (n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:n]))
    return max(lengths, default=0)
