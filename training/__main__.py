import sys

try:  # loading TensorFlow takes seconds: a Ctrl-C then is one line too, not a traceback
    from training.cli import main
except KeyboardInterrupt:
    print("interrupted before training started", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
