import signal
import sys

# Loading TensorFlow takes seconds: a Ctrl-C then is one line too, not a traceback. The
# interrupt is also remembered, since one raised inside TensorFlow's import can be swallowed
# there (a bare except, or a finaliser where Python drops it) and the import would go on,
# or turned into another error (Keras' "you need to have `optree` installed" when it came
# while optree was imported).
interrupted = []


def _on_interrupt(signum, frame):
    interrupted.append(signum)
    raise KeyboardInterrupt


signal.signal(signal.SIGINT, _on_interrupt)
try:
    from training.cli import main
except BaseException:
    if not interrupted:
        raise
signal.signal(signal.SIGINT, signal.default_int_handler)
if interrupted:
    print("interrupted before training started", file=sys.stderr)
    raise SystemExit(130)

raise SystemExit(main())
