"""Errors a user can cause. The entry point prints them as one line and exits non-zero."""


class UserError(Exception):
  """Bad input, config or environment: the message says what is wrong and what to do."""
