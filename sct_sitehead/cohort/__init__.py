"""Cohorts: many scans through one model load. Finding the scans (:mod:`.scans`), the work plan and its skip rule
(:mod:`.plan`), one scan's run and record (:mod:`.work`), the cohort table (:mod:`.table`) and the runners, in one
process or on Dask (:mod:`.execute`)."""
