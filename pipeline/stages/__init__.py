"""Stage bodies, one module per stage, each registered with `pipeline.executor.stage`."""
