"""Entry-point wrapper: a user's mistake ends in one sentence on stderr, not a traceback."""
import os
import sys

from tqdm import tqdm

from utils.checkpoint import CheckpointError
from utils.config import ConfigError
from utils.data.imageio import DataError
from utils.training import TrainingError

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError)


def user_message(error):
    """The error's own sentence. One raised in a DataLoader worker arrives with the worker's traceback
    folded into its text; only the sentence after the traceback is the message."""
    text = str(error)
    marker = f"{type(error).__module__}.{type(error).__qualname__}: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1]
    return text.strip()


def warn(message):
    """One line on stderr that leaves progress bars intact."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def run_main(main, argv=None):
    if not sys.stderr.isatty():  # logs of batch jobs: a progress line every 30 s, not every step
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is printed escaped, never fatal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        code = main(argv)
    except USER_ERRORS as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished files are kept, partial ones were never given their final names.",
              file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
