"""The error root of the statemachine layer; the CLI maps these to messages and exit codes."""


class OvernightError(Exception):
    """A problem the user can act on; its message is one clear line."""


class NotAMarketplace(OvernightError):
    pass


class UnknownPlugin(OvernightError):
    pass


class StoppedBySignal(OvernightError):
    """A signal stopped a command before it had anything to record of its own (a run during its
    first scan: no run was started). `signal` is the signal's name."""

    def __init__(self, signal: str) -> None:
        super().__init__(f"interrupted by {signal}")
        self.signal = signal
