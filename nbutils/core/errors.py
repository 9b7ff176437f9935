"""The one exception type for mistakes a user can fix.

A `UserError` carries a message that names the problem and the fix. The command line prints it as one
paragraph instead of a traceback; library callers can catch it like any other exception.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, with a message saying how to fix it."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Pickled as its two parts (a Ray task's error reaches the driver as the same UserError)."""
        return (type(self), (self.problem, self.fix))
