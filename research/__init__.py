"""GLM research models on MindSpore + MindFormers.

Importing the package imports MindFormers once, quietly: its import-time notices (the optional
`hyper_parallel` models it cannot load, MindSpore's `mindspore.common.api` deprecation) say
nothing about these models and would otherwise open every command's output. MindFormers' log
lines go to stderr, so stdout holds only what a script prints, and its log files go to
`output/log` at the repository root instead of an `output/` in whatever folder a script starts.
"""
import contextlib
import io
import logging
import os
import re
import sys

_IMPORT_NOISE = re.compile(r"No module named 'hyper_parallel'|"
                           r"Module 'mindspore\.common\.api' is deprecated")


def _import_mindformers_quietly():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("LOG_MF_PATH", os.path.join(root, "output", "log"))
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        import mindformers  # noqa: F401  (the import is the point)
    # Handlers made during the import hold the capture buffer: point them at stderr.
    for logger in list(logging.Logger.manager.loggerDict.values()):
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, logging.StreamHandler) and handler.stream is captured:
                handler.setStream(sys.stderr)
    for line in captured.getvalue().splitlines():
        if not _IMPORT_NOISE.search(line):
            print(line, file=sys.stderr)


_import_mindformers_quietly()
