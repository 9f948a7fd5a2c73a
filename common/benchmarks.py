"""Readers for the published benchmark files the five papers report on, each converted to its
script's own record format. Plumbing, not the papers' ideas: each reader maps one published
schema (field names, answer markers, image layout) onto the script's records, reading the file
with `common.data.read_records` and failing with `file:line` sentences. The scoring rule of each
benchmark stays in its script, next to the numbers it produces.

One section per script, in the order of the README.
"""
from __future__ import annotations
