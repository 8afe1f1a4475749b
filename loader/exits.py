"""Every command line's ``main()``: the exit status, one line per problem, signals.

:func:`run_main` parses the arguments and runs the command's body. Exit 0 when it worked,
the body's 1 for a partial failure (some scans rejected, a damaged chunk found), 2 for a
usage error or unusable input (one line on stderr, never a traceback), 130 for Ctrl-C or
SIGTERM (which schedulers send before a kill, and which is taken as Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable

from loader.files import is_disk_full, written_file
from loader.options import SettingError


def run_main(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    body: Callable[[argparse.Namespace], int],
    flags: dict[str, str] | None = None,
    hint: Callable[[argparse.Namespace], str] = lambda args: "",
    interrupt_hint: Callable[[argparse.Namespace], str] | None = None,
) -> int:
    """Parse ``argv`` and run ``body(args)``: the ``main()`` of every command line.

    Args:
        parser: the command's parser.
        argv: the arguments; None reads ``sys.argv``.
        body: does the work; returns the exit status (0, or 1 for a partial failure).
        flags: setting name -> flag, so that a :class:`SettingError` names flags.
        hint: text added to the line of an interrupt or a system error (e.g. how to
            continue); "" for none.
        interrupt_hint: text added to an interrupt's line instead of ``hint``.

    Returns:
        The exit status: the body's, 2 for a usage error or unusable input (one line on
        stderr, no traceback), 130 for Ctrl-C or SIGTERM.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the problem
        return int(exc.code or 0)
    restore = _terminate_as_interrupt()
    try:
        return body(args)
    except SettingError as exc:
        _error(exc.render(flags or {}))
    except KeyboardInterrupt:
        print(f"interrupted{(interrupt_hint or hint)(args)}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as exc:
        _error(str(exc))
    except OSError as exc:  # the disk filled up, a network filesystem went away
        if is_disk_full(exc):
            where = written_file(exc) or getattr(args, "output", None) or "a file"
            _error(f"{where}: the disk is full (no space left on device){hint(args)}")
        else:
            _error(f"{_first_line(exc)}{hint(args)}")
    finally:
        restore()
    return 2


def resume_command(package: str, argv: list[str]) -> str:
    """The command line that continues an interrupted run: the same arguments, without
    ``--overwrite``, with ``--resume``.

    >>> resume_command("training", ["s.h5", "-o", "run", "--overwrite"])
    'python -m training s.h5 -o run --resume'
    """
    command = ["python", "-m", package, *(a for a in argv if a != "--overwrite")]
    return shlex.join(command if "--resume" in command else [*command, "--resume"])


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _error(line: str) -> None:
    print(f"error: {line}", file=sys.stderr)


def _terminate_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM (what schedulers send before a kill) raise KeyboardInterrupt, like Ctrl-C.

    A signal that lands while Python runs a garbage collector's callback (a logging
    handler's, a weak reference's) has its exception dropped there ("Exception ignored
    in ..."), and the command would go on as if never stopped: such a dropped interrupt
    is sent again 10 ms later, and raised where the command is. Returns what undoes this.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    def send_again() -> None:
        if signal.getsignal(signal.SIGTERM) is interrupt:  # the command still runs
            os.kill(os.getpid(), signal.SIGTERM)

    def dropped(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            again = threading.Timer(0.01, send_again)  # once this callback has returned
            again.daemon = True
            again.start()
        else:
            hook(unraisable)

    previous, hook = signal.signal(signal.SIGTERM, interrupt), sys.unraisablehook
    sys.unraisablehook = dropped

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = hook

    return restore
