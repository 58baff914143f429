"""SGLang's own JSON contract for `/generate` (msgspec structs generated from its protobuf schema).

`api_types.py` beside this file is copied unchanged from the sglang 0.5.23 wheel
(`sglang/api/v1/api_types.py`, Apache-2.0, attribution in its header). It depends only on
`msgspec`. SGLang's server decodes every `/generate` body with
`GenerateRequest.from_json_value(body)` and answers HTTP 400 on `JsonContractError`; the
embedded engine does the same, and the tests decode every embedded response with
`GenerateResponse.from_json_value(item)`.

When the real `sglang` package is installed, its own copy of the file is loaded instead (by
path: importing `sglang` itself would pull in torch, CUDA kernels and much more).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType


@functools.cache
def load_api_types() -> ModuleType:
    """Load SGLang's `api_types` module: the installed sglang's when present, else ours.

    Returns:
        The module, with `GenerateRequest`, `GenerateResponse` and `JsonContractError`.
    """
    path = Path(__file__).with_name("api_types.py")
    spec = importlib.util.find_spec("sglang")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations)), "api", "v1", "api_types.py")
        path = installed if installed.is_file() else path
    module_spec = importlib.util.spec_from_file_location("sglang_api_v1_api_types", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
