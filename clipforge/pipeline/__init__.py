"""Dataset builder (`kind: build`): URL lists -> WebDataset shards; entry point `build.run_build`."""
