"""The library core: bytes → decoded image → planned views → rendered pixels → mean (and variance).

No web framework here: the engine and the HTTP door build on it, and `embed()` is the library call.
"""
