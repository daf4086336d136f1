"""The resume journal as a sink: records of one-file formats kept per input as they come, each
input marked done with the files written for it; at the end the one-file output is assembled
from the journal, every finished input in input order (segcli.predict.formats)."""

from __future__ import annotations

from segcli.predict.formats import FORMATS
from segcli.predict.loop import Finished, Result, RunContext, Sink


class JournalSink(Sink):
    def __init__(self, context: RunContext) -> None:
        self.context = context
        self.journal = context.journal
        self.keeps_records = not context.plan.per_image

    def on_result(self, result: Result) -> list[str]:
        if self.keeps_records:
            self.journal.add_records(result.key, [result.record])
        return []

    def on_input_done(self, done: Finished) -> list[str]:
        if done.signature is not None:
            self.journal.done(done.key, done.signature, done.files)
        return []

    def on_failed(self, index: int, key: str) -> None:
        self.journal.forget_pending(key)

    def finish(self) -> None:
        if not self.keeps_records:
            return
        journal, keys = self.journal, self.context.keys

        def done_records():
            return (record for key in keys if journal.is_done(key) for record in journal.records(key))

        FORMATS[self.context.plan.format].write(self.context.plan.out, done_records, self.context)


def journal_sink(context: RunContext) -> Sink | None:
    return None if context.journal is None else JournalSink(context)

