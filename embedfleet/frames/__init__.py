"""The frames every layer shares: the pyarrow schemas of each stage's output, and atomic writes.

Below datasets, embedders, sinks and tasks (DESIGN §7): of embedfleet it imports only the errors.
"""
