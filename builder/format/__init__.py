"""The dataset folder format, the one thing every part of spa-vl writes and reads.

- ``layout``: where every file sits, which files make which config, shard names (ground);
- ``manifest``: ``manifest.json`` read and written one way, and ``DatasetFolder``, the folder as one value
  (root, parsed manifest, taxonomy) that the commands pass on (ground);
- ``output``: the guard every command that writes a folder calls first (ground);
- ``schema``: row schemas and the row check; ``shards``: parquet shards; ``writer``: the folder writer;
  ``history``: the row ids of the last released version (rows).

    from builder.format.manifest import DatasetFolder
    folder = DatasetFolder.open("out/spa_vl")
"""
