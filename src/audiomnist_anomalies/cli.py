"""Entry-point plumbing shared by the stage modules.

Every stage is run as ``python -m audiomnist_anomalies.<stage>`` from the
project root. `run_stage` parses the common options, validates
``params.yaml`` before any work, logs one start and one end line, and turns
a `PipelineError` into one clear line on standard error (the traceback
only with ``--debug``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

from .errors import PipelineError
from .params import load_params

log = logging.getLogger("audiomnist_anomalies")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# The shell's convention for a process ended by SIGTERM: 128 + 15.
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler, so a termination request unwinds like Ctrl-C."""


def configure_logging(debug: bool = False) -> None:
    """Log to standard error with time stamps; DEBUG level under ``--debug``."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # Numba, faiss and Matplotlib log set-up details that are irrelevant to the analysis.
    logging.getLogger("numba").setLevel(logging.WARNING)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def make_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """Build the argument parser every stage shares."""
    parser = argparse.ArgumentParser(
        prog=f"python -m audiomnist_anomalies.{stage}",
        description=description,
    )
    parser.add_argument(
        "--params",
        default="params.yaml",
        metavar="FILE",
        help="parameter file to read (default: params.yaml in the current folder)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="log debug messages and show the traceback of an error",
    )
    return parser


def run_stage(
    stage: str,
    description: str,
    work: Callable[[dict[str, dict[str, Any]], argparse.Namespace], str],
    argv: list[str] | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> int:
    """Run one stage and return its exit status.

    Parameters
    ----------
    stage : str
        Stage name, used in the log lines.
    description : str
        One-paragraph help text for ``--help``.
    work : callable
        Receives the validated parameters and the parsed options and returns
        a one-line summary of its outputs for the end line.
    argv : list of str, optional
        Command-line arguments, ``sys.argv[1:]`` by default.
    parser : argparse.ArgumentParser, optional
        A parser from `make_parser` with stage-specific options added.

    Returns
    -------
    int
        0 on success, 2 for a user-correctable error, 130 when interrupted
        by Ctrl-C, 143 when stopped by SIGTERM.
    """
    parser = parser or make_parser(stage, description)
    options = parser.parse_args(argv)
    configure_logging(options.debug or bool(os.environ.get("AUDIOMNIST_DEBUG")))
    started = time.perf_counter()
    # A termination request (kill, timeout, a cancelled job) unwinds like
    # Ctrl-C, so temporary outputs are removed and worker processes stopped.
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        params = load_params(options.params)
        summary = work(params, options)
    except PipelineError as error:
        if options.debug:
            log.exception("%s failed", stage)
        else:
            log.error("%s failed: %s", stage, error)
        return EXIT_USER_ERROR
    except FileNotFoundError as error:
        # DVC deletes a stage's outputs before rerunning it, so after a failed
        # or interrupted run a later stage can find its inputs missing.
        if options.debug:
            log.exception("%s failed", stage)
        else:
            log.error(
                "%s failed: input not found: %s. Run the earlier stages first: "
                "dvc repro %s",
                stage,
                error.filename,
                stage,
            )
        return EXIT_USER_ERROR
    except KeyboardInterrupt as interrupt:
        log.error("%s interrupted; no partial outputs were kept", stage)
        return interrupted_status(interrupt)
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("%s done in %.1f s: %s", stage, time.perf_counter() - started, summary)
    return 0


def terminate(signum: int, frame: Any) -> None:
    """SIGTERM handler: raise `Terminated` in the main thread."""
    raise Terminated


def interrupted_status(interrupt: KeyboardInterrupt) -> int:
    """Exit status for an interrupt: 143 after SIGTERM, 130 after Ctrl-C."""
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED


def exit_with(status: int) -> None:
    """Exit the interpreter with ``status``; a helper for ``__main__`` blocks."""
    raise SystemExit(status)
