"""How every ``python -m hatmodel.<command>`` ends on bad input: a ``ValueError`` or
``TypeError`` (a config key, an argument, a file that is not what it should be; each names what
is wrong) is printed as one line, ``<prog>: error: <message>``, with exit status 2, as argparse
does for usage errors, instead of a traceback. Any other exception is a bug and keeps its
traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def run(main: Callable[[], Any], prog: str) -> None:
    """Call a command's ``main()`` and turn a bad-input error into a one-line message."""
    try:
        main()
    except (ValueError, TypeError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
