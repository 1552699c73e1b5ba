"""The errors a user can fix: bad config, input, location or data.

Every error dkm raises for something the user gave it derives from :class:`UserError`;
``dkm`` (the command) reports these as one paragraph and exit 2, and anything else as a
failure (exit 1, the traceback with ``--debug``), so an internal bug is never passed off
as bad input. No imports: every layer may raise these.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave dkm is wrong; the message names it and says what to do."""


class InvalidDataError(UserError, ValueError):
    """The data cannot be fitted as given: too few points, bad sample weights, values too
    large for the dtype, the wrong number of features."""
