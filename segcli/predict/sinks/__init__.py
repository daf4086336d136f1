"""Sinks: where results go (see segcli.predict.loop for the protocol, segcli.predict.pipeline for
which a run has, in which order)."""
