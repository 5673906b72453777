"""A hostile object for the head-file tests: building it writes a marker file."""

from pathlib import Path


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __setstate__(self, state: dict) -> None:  # skops rebuilds objects through this
        Path(state["marker"]).write_text("the payload ran")
        self.__dict__.update(state)
