"""Executors: where prediction units and training jobs run (this machine's processes, a Dask cluster)."""
