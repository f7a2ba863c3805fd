"""Keep exporters quiet: collect their warnings and log records instead of printing them."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["captured"]

#: namespaces of the loggers the exporters write progress and advice to
_NAMESPACES = ("torch", "onnxscript", "onnx_ir")
_DROPPED = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
#: loggers whose records say nothing about the model (e.g. optional torchvision ops)
_IGNORED = frozenset({"torch.onnx._internal.exporter._registration"})
_LIMIT = 20


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        if record.name in _IGNORED:
            return
        try:
            text = record.getMessage()
        except Exception:  # a malformed record must not break an export
            text = str(record.msg)
        _add(self.messages, text)


def _loggers() -> list[logging.Logger]:
    """The namespace roots, and every logger below them that has handlers of its own
    (torch gives some module loggers a stderr handler directly)."""
    roots = [logging.getLogger(name) for name in _NAMESPACES]
    below = [
        logger
        for name, logger in list(logging.Logger.manager.loggerDict.items())
        if isinstance(logger, logging.Logger)
        and logger.handlers
        and name.startswith(tuple(f"{ns}." for ns in _NAMESPACES))
    ]
    return roots + below


def _add(messages: list[str], text: str) -> None:
    line = text.strip().splitlines()[0][:300] if text.strip() else ""
    if line and line not in messages and len(messages) < _LIMIT:
        messages.append(line)


@contextmanager
def captured() -> Iterator[list[str]]:
    """Within the block, exporter warnings and log records go into the yielded list
    (first line of each, de-duplicated; deprecation notices dropped) instead of stderr.

    The exporters' loggers get this one handler for the duration; their own handlers
    are put back afterwards. What they print (torch.export prints a partial graph to
    stderr when it fails) is discarded: ``sys.stdout``/``sys.stderr`` are redirected for
    the block, so packaging is not meant to run beside threads that print.
    """
    messages: list[str] = []
    handler = _Collect(messages)
    saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
    for logger in _loggers():
        saved.append((logger, list(logger.handlers), logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False
    sink = io.StringIO()
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("always")
            try:
                yield messages
            finally:
                for w in caught:
                    if not issubclass(w.category, _DROPPED):
                        _add(messages, f"{w.category.__name__}: {w.message}")
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
