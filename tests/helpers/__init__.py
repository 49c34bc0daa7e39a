"""Helpers only the tests use: launching ranks (distributed), the synthetic store log (store_data) and the
DeepSpeed configurations (zero_configs). Models, references and the backend conformance checks are in
shardshap.testing. Tests import these as `from helpers import ...` (pyproject puts tests/ on the path)."""
