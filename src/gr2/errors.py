"""The one base class for errors a user should see as one line.

Every domain's error type (LakeError, SourceError, AlignmentError, CheckpointError, ...) derives
from `Gr2Error`; the `gr2` command catches it at its boundary and prints the message, nothing more.
Anything else that escapes is a bug and keeps its traceback.
"""


class Gr2Error(Exception):
    """A problem with what the user asked for or gave us; its message names the input and the fault."""
