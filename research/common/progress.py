"""A progress line for long conversions, with the standard library only (no tqdm at runtime).

On a terminal the line is rewritten in place (`\\r`); in a log file or a pipe it is printed
once per tenth of the work, so logs stay short.
"""
import sys
import time


class Progress:
    """`count/total`, rate and elapsed time of `description`; call `update()` per item done."""

    def __init__(self, total, description, unit="items", stream=None):
        self.total = total
        self.description = description
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self._start = time.monotonic()
        self._interactive = self.stream.isatty()
        self._tenths_reported = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    def update(self, count=1):
        self.count += count
        if self._interactive:
            self.stream.write("\r" + self.line())
            self.stream.flush()
            return
        tenths = 10 * self.count // max(self.total, 1)
        if tenths > self._tenths_reported:
            self._tenths_reported = tenths
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self):
        elapsed = time.monotonic() - self._start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        return (f"{self.description}: {self.count}/{self.total} {self.unit} "
                f"({rate:.1f} {self.unit}/s, {elapsed:.1f} s)")

    def close(self):
        """End the in-place line on a terminal."""
        if self._interactive:
            self.stream.write("\n")
            self.stream.flush()
