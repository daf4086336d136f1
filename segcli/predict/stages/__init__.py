"""Stages: transform each result, in order, before any sink sees it (see segcli.predict.loop)."""
