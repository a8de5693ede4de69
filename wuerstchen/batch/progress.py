"""One tqdm bar over all jobs: finished and failed counts, jobs per second (tqdm's rate)."""

from __future__ import annotations


class Progress:
    def __init__(self, total: int, skipped: int = 0, enabled: bool = True):
        from tqdm import tqdm

        self.finished = self.failed = 0
        self.skipped = skipped
        self.bar = tqdm(total=total, initial=skipped, desc="batch", unit="job", disable=not enabled, smoothing=0.1)
        self.bar.set_postfix(finished=0, failed=0, skipped=skipped)

    def update(self, ok: bool) -> None:
        if ok:
            self.finished += 1
        else:
            self.failed += 1
        self.bar.set_postfix(finished=self.finished, failed=self.failed, skipped=self.skipped, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
