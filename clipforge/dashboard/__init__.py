"""Monitoring dashboard: a read-only web UI over a folder of runs (`clipforge dashboard --runs PATH`).

Pages: runs table, run page (live curves), compare, scaling (power-law fit of a sweep), and 'try it'
(score captions against an image with a checkpoint). Charts are plain SVG drawn in the page, so the
dashboard works on offline clusters and needs nothing beyond the standard library to serve.
"""
