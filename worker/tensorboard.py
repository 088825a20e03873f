"""A job's metrics as TensorBoard event files, uploaded with its other artifacts.

Written as the run goes (every step's and every evaluation's scalars, under their metric
names), then uploaded to `jobs/<id>/tensorboard/` once the run ends, whatever way it ends, so
`tensorboard --logdir <a download of that folder>` shows the curves of any job.
"""

from __future__ import annotations

from pathlib import Path

from core.callbacks import Callback, EvalReport, StepReport
from store.artifacts import ArtifactStore, UploadedArtifact, tensorboard_key


class TensorBoardWriter(Callback):
    def __init__(self, log_dir: Path) -> None:
        # tensorboardX writes the event files without TensorFlow or the TensorBoard server.
        from tensorboardX import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(logdir=str(log_dir), flush_secs=10)

    def on_step(self, report: StepReport) -> None:
        for name, value in report.metrics.items():
            self.writer.add_scalar(name, value, report.step)

    def on_eval(self, report: EvalReport) -> None:
        for name, value in report.metrics.items():
            self.writer.add_scalar(name, value, report.step)
        self.writer.flush()

    def upload(self, artifacts: ArtifactStore, job_id: str) -> UploadedArtifact:
        self.writer.close()
        return artifacts.upload_dir(self.log_dir, tensorboard_key(job_id))
