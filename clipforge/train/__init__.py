"""Contrastive training on Ray Train (`kind: train`); the entry point is `clipforge.train.trainer.run_train`.

Importing this package stays cheap: job specs import `clipforge.train.spec` without loading torch or Ray.
"""
