from preprocess.workers import start_early

start_early()  # the workers' server imports on the other core while this process does

from preprocess.cli import main  # noqa: E402

raise SystemExit(main())
