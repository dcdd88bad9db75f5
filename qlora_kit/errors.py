"""The one error type for problems a user can cause and fix (config, data, files)."""


class QLoRAKitError(Exception):
    """A problem in the user's input: the message says what is wrong and how to fix it.

    The command line prints it without a traceback and exits non-zero. Bugs in
    qlora_kit itself still raise their own exception types.
    """
