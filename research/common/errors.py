"""The one exception type for bad user input (files, configs, prompts).

Run scripts catch it at the top level, print the message and exit with code 2, so a
user sees what is wrong instead of a traceback from deep inside MindSpore.
"""


class UserInputError(Exception):
    """Raised for input a user can fix: a missing file, a wrong config field, a long prompt."""
