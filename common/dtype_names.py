"""The float dtype names users may give, without importing torch (the command line checks
them before torch loads; :mod:`mksuite.common.dtypes` maps them to torch dtypes)."""

FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16")
"""The floating dtypes a model is computed and stored in (``--dtype``, ``torch_dtype``)."""
