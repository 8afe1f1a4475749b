import os
import signal

# Loading TensorFlow takes seconds: a Ctrl-C then is one line too, not a traceback. The
# process ends right in the handler, with nothing to unwind: a KeyboardInterrupt raised
# inside TensorFlow's import could be swallowed there (a bare except, a finaliser), turned
# into another error (Keras' "you need to have `optree` installed"), crash the process
# (SIGSEGV, 1 in 60 Ctrl-Cs) or, having passed through Python run from C (pybind11's exec),
# make Python end itself by SIGINT whatever the exit status (1 in 30). Nothing is written
# before training starts, so there is nothing to finish. The line goes to the stderr the
# process started with: the import sends fd 2 to /dev/null for a while (training/cli.py).
STDERR = os.dup(2)


def _on_interrupt(signum, frame):
    os.write(STDERR, b"interrupted before training started\n")
    os._exit(130)


signal.signal(signal.SIGINT, _on_interrupt)
from training.cli import main  # noqa: E402

signal.signal(signal.SIGINT, signal.default_int_handler)
os.close(STDERR)

raise SystemExit(main())
