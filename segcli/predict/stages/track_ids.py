"""--track: a track id on every instance of a video frame's record (segcli.predict.tracking),
from all the frame's detections, candidates below --score-thr included."""

from __future__ import annotations

from segcli.predict.loop import Result, RunContext, Stage
from segcli.predict.tracking import VideoTracks, add_track_ids


class TrackIds(Stage):
    def __init__(self, tracks: VideoTracks) -> None:
        self.tracks = tracks

    def on_result(self, result: Result) -> None:
        found = result.found
        if found.frame is not None:
            add_track_ids(result.record, self.tracks.assign(result.index, found.frame, found.boxes, found.scores,
                                                            found.category_ids, found.rles))

    def on_input_done(self, index: int) -> None:
        self.tracks.finish(index)

    def on_failed(self, index: int) -> None:
        self.tracks.finish(index)


def track_ids(context: RunContext) -> Stage | None:
    options = context.options
    return None if options.track is None else TrackIds(VideoTracks(options.track, options.score_thr))
