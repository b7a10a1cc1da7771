"""A compress run's evaluation: perplexity before and after, its summary in the report, the quality gate.

Both measurements score the same windows of the same text. An in-RAM run measures its loaded model (after the
stages, with the scales rounded as the file stores them); a streamed run measures the source checkpoint and its
own written output directory, one decoder layer at a time (:mod:`compressor.streaming.perplexity`), so neither
needs the whole model in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.models.loading import LoadedModel
from compressor.timing import phase


@dataclass
class RunEvaluation:
    """``--eval``'s settings and results for one compress run."""

    data: str
    seq_len: int
    max_tokens: int | None
    device: str
    max_increase: float | None  # percent; None: no quality gate
    timings: dict[str, float]  # the run's; each measurement adds its wall time as ``eval_<which>``
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def measure(self, which: str, subject: LoadedModel | Path, dtype: str = "auto") -> None:
        """Score ``subject`` as ``which`` (before/after): a loaded model, or a directory streamed in ``dtype``."""
        with phase(self.timings, f"eval_{which}"):
            self._measure(which, subject, dtype)

    def _measure(self, which: str, subject: LoadedModel | Path, dtype: str) -> None:
        from compressor import pipeline, streaming

        if isinstance(subject, Path):
            result = streaming.evaluate(subject, self.data, seq_len=self.seq_len, max_tokens=self.max_tokens,
                                        device=self.device, dtype=dtype)
        else:
            result = pipeline.evaluate(subject, self.data, seq_len=self.seq_len, max_tokens=self.max_tokens,
                                       device=self.device)
        self.results[which] = result.to_dict()

    def summary(self) -> dict[str, Any]:
        """The report's ``eval``: both results and the relative perplexity increase in percent."""
        before, after = self.results["before"], self.results["after"]
        increase = 100.0 * (after["ppl"] / before["ppl"] - 1.0)
        return {"source": self.data, "before": before, "after": after, "increase_pct": round(increase, 4)}

    def gate(self, summary: dict[str, Any]) -> dict[str, Any] | None:
        """The report's ``quality_gate`` (None without a limit); a failed gate fails the run after writing."""
        if self.max_increase is None:
            return None
        increase = float(summary["increase_pct"])
        passed = increase <= self.max_increase
        verdict = "within" if passed else "exceeds"
        message = f"perplexity increase {increase:+.2f}% {verdict} the limit of {self.max_increase:.2f}%"
        return {"passed": passed, "limit_pct": self.max_increase, "increase_pct": increase, "message": message}

    def judge(self, report: Any) -> None:
        """Put the summary and the gate into ``report`` (a :class:`compressor.report.Report`)."""
        report.eval = self.summary()
        report.quality_gate = self.gate(report.eval)

    def judge_output(self, report: Any) -> Callable[[Path], None]:
        """For a streamed run: score the written output directory (before the report is written), then judge."""

        def judge(output: Path) -> None:
            self.measure("after", output, report.dtype)
            self.judge(report)

        return judge
