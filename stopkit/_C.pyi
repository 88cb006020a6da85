# Type stub of the pybind11 module stopkit._C (csrc/): its functions take and return plain ints,
# floats and strings, and pybind11 checks their arguments at run time.
from typing import Any

def __getattr__(name: str) -> Any: ...
