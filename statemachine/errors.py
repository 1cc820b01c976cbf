"""The error root of the statemachine layer; the CLI maps these to messages and exit codes."""


class OvernightError(Exception):
    """A problem the user can act on; its message is one clear line."""


class NotAMarketplace(OvernightError):
    pass


class UnknownPlugin(OvernightError):
    pass
