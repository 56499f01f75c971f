"""The one exception type for user mistakes.

A ``UserError`` carries a single line that names the file, entry or field at fault. The CLI prints it without a
traceback and exits with status 2; the server turns it into a 4xx answer. Anything else is a bug (exit 1).
"""


class UserError(Exception):
    """A mistake in the user's input (file, config, text, checkpoint); the message is one line."""
