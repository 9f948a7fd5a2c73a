"""The one exception a user sees as a sentence. Imports nothing of ours; everything may import it.

`UserError("one sentence")`: something the user asked for cannot happen, and the sentence says
what and how to fix it. `common.cli.run_stages` prints it as `error: ...` and exits 2.
"""


class UserError(Exception):
    """Something the user asked for cannot happen; the message is one sentence saying what and how
    to fix it. Printed as `error: ...` (exit 2) by `run_stages`."""
