"""User-facing errors: one line, naming the file, line, field or option at fault."""


class AlignRLError(Exception):
    """An error caused by user input (config, data, reward function); printed as one line, no traceback."""
