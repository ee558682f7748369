"""Errors a user can fix. `jaxlab` prints them as one `jaxlab: <message>` line (the traceback only under
`--debug`) and exits with the error's `exit_code`: 2 for a bad command line, config or data path, 1 for a
run that cannot go on (a busy workdir, no usable checkpoint, a non-finite loss).

Each subclass lives next to the code that raises it (ConfigError in jaxlab.config, DatasetNotFoundError in
jaxlab.data.sources, WorkdirBusyError and ConfigChangedError in jaxlab.train.workdir, CheckpointError in
jaxlab.train.checkpoint); its message says what is wrong and what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for or pointed at, not a bug in jaxlab."""

    exit_code = 1


class UsageError(UserError):
    """A command line that names something that is not there (e.g. eval of a workdir with no run)."""

    exit_code = 2


def exit_code(err: BaseException) -> int:
    """The process exit code for `err`: its `exit_code` for a UserError, else 1."""
    return int(getattr(err, "exit_code", 1)) if isinstance(err, UserError) else 1
