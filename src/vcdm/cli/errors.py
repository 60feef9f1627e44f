"""User errors as one ``Error:`` line and a non-zero exit, never a traceback: library errors (ValueError
subclasses with a full message) and the OS errors of writing outputs (permission, full disk, name too
long, missing parent), which name the path."""
from __future__ import annotations

import contextlib
import errno
import os
import re
from typing import Iterator

import click

from vcdm.paths import check_writable, describe_os_error

# torch.save reports a failed write as RuntimeError ("[enforce fail at inline_container.cc] ... unexpected pos",
# "file write failed"), without errno.
TORCH_WRITE_FAILED = re.compile(r"inline_container|file write failed|unexpected pos")


@contextlib.contextmanager
def user_errors(usage: bool = False, path: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn library and OS errors raised in the block into click's one-line error (exit 1, or 2 for a
    usage error: when ``usage``, or for an error whose class sets ``usage_error``); ``path``: the output
    an OS error without a file name concerns. Progress bars are ``with tqdm(...)`` blocks, whose exit ends
    their line before the error is printed."""
    try:
        yield
    except ValueError as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        usage = usage or getattr(e, "usage_error", False)  # a bad flag value (vcdm.generate's FlagError)
        raise (click.UsageError(message) if usage else click.ClickException(message)) from None
    except OSError as e:
        raise click.ClickException(describe_os_error(e, path)) from None
    except RuntimeError as e:
        if not TORCH_WRITE_FAILED.search(str(e)):
            raise
        raise click.ClickException(describe_os_error(OSError(errno.EIO, "write failed (disk full?)"), path)) from None


def writable(path: str | os.PathLike | None, flag: str, *, is_dir: bool = True) -> None:
    """Fail with one line before any work when ``path`` (if given) cannot be written."""
    if path is not None:
        with user_errors():
            check_writable(path, flag, is_dir=is_dir)
