"""Issue 31: long steps show their rate and time left; where the output is not a terminal (CI
logs) as plain lines, not a bar's carriage returns. Fast: no Ray."""

import io

from tqdm import tqdm

from components.progress import PlainProgress, progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_plain_lines_count_the_rate_from_the_first_advance_and_say_the_time_left(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("components.progress.time.monotonic", clock)
    out = io.StringIO()
    bar = progress(100, "training", unit="step", file=out)  # a StringIO is no terminal
    assert isinstance(bar, PlainProgress)
    clock.now += 40  # start-up: no step yet, but a line says the step is alive
    bar.set_postfix_str("shard 0: starting", refresh=False)
    bar.update(0)
    bar.update(10)  # the first advance starts the rate's clock
    clock.now += 30
    bar.update(30)  # 30 steps in 30 s: 1 step/s, 60 left
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "training: 0/100 steps [00:40 elapsed, ? left, 0.00 steps/s, shard 0: starting]"
    assert lines[1] == "training: 40/100 steps [01:10 elapsed, 01:00 left, 1.00 steps/s, shard 0: starting]"
    assert lines[-1] == lines[1]  # close says where it ended
    assert "\r" not in out.getvalue()


def test_a_terminal_gets_a_tqdm_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = progress(10, "frozen trunk", unit="prompt", file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
