"""Progress of long work: tqdm on a terminal, plain periodic lines elsewhere (logs, CI, ray job logs)."""

import io

from vpd_ray.progress import Lines, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with progress(10, "nyu-train", unit="sample", stream=out, every_s=0.0) as bar:
        assert isinstance(bar, Lines)
        bar.set_postfix_str("1 failed")
        bar.update(4)
        bar.update(6)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("nyu-train: 4/10 samples (") and lines[0].endswith(", 1 failed)")
    assert lines[-1].startswith("nyu-train: 10/10 samples") and "\r" not in out.getvalue()


def test_short_work_stays_silent_and_close_is_idempotent():
    out = io.StringIO()
    bar = progress(None, "infer", unit="image", stream=out, every_s=3600)
    bar.update(3)
    bar.close()
    bar.close()
    assert out.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    out = Terminal()
    with progress(5, "infer", unit="image", stream=out) as bar:
        bar.update(5)
    assert type(bar).__name__ == "tqdm" and "5/5" in out.getvalue()
