"""Evaluation (`kind: eval`): retrieval, zero-shot classification, linear and few-shot probes, CLIP_benchmark output.

metrics / retrieval_tiled / probe (pure torch) · templates (prompt sets) · datasets, idx, loading
(shards, image folders, IDX files) · features, fingerprint, cache (tower features and the embedding
cache) · embed (Ray Data image embedding) · tables (results.csv / .md) · runner (`run_eval`).
Importing this package stays cheap: job specs import `clipforge.eval.spec` without loading torch or Ray.
"""
