"""The dataset folder format: layout, manifest, schema, shards, the folder writer."""
