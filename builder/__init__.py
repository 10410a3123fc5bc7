"""The spa-vl toolkit: taxonomy, schema, shards, the dataset folder, fixtures and upstream import."""
