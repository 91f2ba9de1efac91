"""The summary a run returns: the last record of OUT/metrics.jsonl, as a dict with typed names."""

from __future__ import annotations


class Summary(dict):
    """A run's summary: a dict (`summary["samples_per_s"]`, json.dumps, == the metrics file's
    last record) whose common keys are also attributes (`summary.samples_per_s`).

    A dict subclass rather than a dataclass because the keys vary with the run: a federation
    has rounds, a resumed run resumed_from, a stopped run step and reason. An attribute whose
    key this run did not report is None.
    """

    __slots__ = ()

    @property
    def event(self) -> str:
        """The record's kind: "summary", or "stopped" for a run stopped by a signal."""
        return self.get("event")

    @property
    def steps(self) -> int | None:
        """Data-parallel: the steps the run reached."""
        return self.get("steps")

    @property
    def rounds(self) -> int | None:
        """A federation: the rounds it ran."""
        return self.get("rounds")

    @property
    def samples(self) -> int | None:
        """Data-parallel: rows trained on over all ranks (steps x global batch)."""
        return self.get("samples")

    @property
    def seconds(self) -> float | None:
        """Wall-clock seconds of the training loop on this rank."""
        return self.get("seconds")

    @property
    def loss(self) -> float | None:
        """Data-parallel: the last step's global mean loss (None if not finite)."""
        return self.get("loss")

    @property
    def samples_per_s(self) -> float | None:
        """Data-parallel: training throughput over all ranks."""
        return self.get("samples_per_s")

    @property
    def accuracy(self) -> float | None:
        """Accuracy on the test set (data.test or `test`), None without one."""
        return self.get("accuracy")

    @property
    def test_loss(self) -> float | None:
        """Mean loss on the test set, None without one."""
        return self.get("test_loss")

    def __repr__(self) -> str:
        return f"Summary({dict.__repr__(self)})"
