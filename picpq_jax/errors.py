"""Errors that mean "the user asked for something that cannot work".

The command line turns a :class:`UserError` into one line on stderr and exit
code 2. Library callers get an ordinary exception (a ``ValueError``) whose message
names the problem and the fix.
"""


class UserError(ValueError):
  """Bad input: a missing path, an unknown name, an option out of range.

  The message must say what is wrong and how to fix it, in one line.
  """
