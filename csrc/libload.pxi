# The library lookup the NCCL and cuDNN bindings share (included by csrc/nccl.pyx and
# csrc/cudnn.pyx; each binding keeps its own globals, symbols and messages).
# Needs, in the including module: os, importlib.util, dlopen/dlerror, RTLD_NOW/RTLD_LOCAL.


def _library_candidates(env_var, wheel_dirs, soname):
    """Paths to try, in order: $env_var alone when set (an explicit choice is never silently
    replaced); else `soname` in each of `wheel_dirs` under the `nvidia` namespace package
    where it exists (found with importlib, without importing CuPy); then `soname` itself,
    for the system's library search path."""
    explicit = os.environ.get(env_var)
    if explicit:
        return [explicit]
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    paths = []
    for sub in wheel_dirs:
        for root in roots:
            path = os.path.join(root, sub, soname)
            if os.path.exists(path) and path not in paths:
                paths.append(path)
    paths.append(soname)
    return paths


cdef void* _open_first(list paths, list tried, list opened) except? NULL:
    """dlopen the first of `paths` that loads, appending its path to `opened`; every failure
    goes to `tried` as "  path: dlerror". NULL when none loads."""
    cdef void* lib = NULL
    for path in paths:
        lib = dlopen(path.encode(), RTLD_NOW | RTLD_LOCAL)
        if lib != NULL:
            opened.append(path)
            return lib
        err = dlerror()
        tried.append(f"  {path}: {err.decode(errors='replace') if err != NULL else 'not found'}")
    return NULL
