"""Open a model in llama-cpp-python with llama.cpp's extra buffer types off.

llama.cpp's AMX matmul crashes inside some virtual machines whose CPUs report AMX (a segfault in
``ggml_backend_amx_mul_mat`` on the model alone). The model parameter ``use_extra_bufts = False``
keeps llama.cpp off those buffer types, but ``llama_cpp.Llama`` has no argument for it (extra
keyword arguments are swallowed), so its default model parameters are patched while it loads.
"""

from __future__ import annotations

from typing import Any


def open_llama(**kwargs: Any) -> Any:
    """``llama_cpp.Llama(**kwargs)`` with ``use_extra_bufts = False``."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    low = llama_module.llama_cpp
    default = low.llama_model_default_params

    def safe_default():
        params = default()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    low.llama_model_default_params = safe_default
    try:
        return llama_cpp.Llama(**kwargs)
    finally:
        low.llama_model_default_params = default
