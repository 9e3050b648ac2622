"""One error type whose message always names the problem and the fix."""

from __future__ import annotations


class ExplorerError(Exception):
    """A user-facing error: `problem` says what is wrong, `fix` says what to do about it."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}")
