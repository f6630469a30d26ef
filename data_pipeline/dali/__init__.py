"""The DALI path (``data.backend=dali``): sources (what each pipeline is fed, per sample), graphs (the pipelines)
and loader (running them as the trainer's loaders; data_pipeline.loaders picks this path)."""
