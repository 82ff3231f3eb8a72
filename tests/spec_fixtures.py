"""A small valid train spec as YAML text, shared by the spec tests (line numbers in their expected messages
count lines of this text)."""

TRAIN_YAML = """\
kind: train
name: t
storage: /tmp/run
model:
  name: tiny
data:
  shards: [/tmp/shards]
  batch_size: 8
optim:
  lr: 0.001
scaling:
  workers: 2
"""
