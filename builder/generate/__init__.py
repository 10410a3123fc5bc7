"""The generation toolkit: config, model access, stages, pipeline, run store, build."""
