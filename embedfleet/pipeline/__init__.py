"""Job -> Dask graph: read -> chunk -> embed -> write -> commit."""
