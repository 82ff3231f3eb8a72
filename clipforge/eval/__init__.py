"""Evaluation (`kind: eval`): zero-shot retrieval and classification, CLIP_benchmark definitions and output.

metrics (pure torch) · templates (prompt sets) · datasets (shards, image folders) ·
embed (Ray Data image embedding) · runner (`run_eval`). Importing this package stays cheap:
job specs import `clipforge.eval.spec` without loading torch or Ray.
"""
