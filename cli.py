"""How the command-line programs (train.py, bench.py, checkpoint.py, tasks.py) end on an error that is not a bug.

A user error (a bad flag, file, value or data line: ValueError, FileNotFoundError, or a SystemExit("message"))
is its one-line message and exit status 2; a run that fails (a diverging step: FloatingPointError) is its
message and status 1; Ctrl-C is status 130. None of them prints a traceback: the messages name the value, the
file and the fix. Anything else is a bug and keeps its traceback.
"""
import sys


def run(main, program: str):
    try:
        return main()
    except (ValueError, FileNotFoundError) as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as leaving:
        if isinstance(leaving.code, str):  # SystemExit("message"): a refusal, said the same way
            print(f"{program}: error: {leaving.code}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    except FloatingPointError as error:
        print(f"{program}: stopped: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
