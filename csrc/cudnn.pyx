# cython: language_level=3
"""A small Cython binding of cuDNN 9's legacy convolution API: what the GPU convolutions
need, nothing more (phase 1 of issue 17: the binding; the layer path comes in phase 2).

Built without CUDA or cuDNN headers (csrc/cudnn_decls.h declares the types, values and
signatures we use, each value with the header it was copied from); `libcudnn.so.9` is
opened at first use, from, in this order:

1. the path in the environment variable ENGINE_CUDNN_LIBRARY, when set (nothing else is
   tried then);
2. the nvidia-cudnn-cu12 or nvidia-cudnn-cu13 wheel, found through the `nvidia` namespace
   package with importlib, without importing CuPy: both 9.x wheels install
   nvidia/cudnn/lib/libcudnn.so.9; nvidia/cu13/lib/libcudnn.so.9 (the directory the other
   CUDA 13 wheels share) is tried too;
3. the system's library search path (libcudnn.so.9).

When none loads, every call raises `CudnnMissing`, which says what was tried and how to
install cuDNN. A failing call raises `CudnnError` with cuDNN's status name
("CUDNN_STATUS_BAD_PARAM"), the code, and cuDNN's message (cudnnGetErrorString, and
cudnnGetLastErrorString's text, which names the check that failed). Every cuDNN call runs
without the GIL.

What works without a GPU (or a CUDA driver): loading, `version()`, the tensor, filter and
convolution descriptors (set, read back, destroy) and `forward_output_dim`. `Handle` needs
a device (cudnnCreate fails with CUDNN_STATUS_NOT_INITIALIZED, "cudaGetDeviceCount(&count)
!= cudaSuccess", without one), and so does everything that takes a handle: the algorithm
searches, the workspace sizes, the three convolutions. On a GPU, cuDNN's sub-libraries dlopen
libcuda.so.1, and some of its engines libcublasLt.so.12 and libnvrtc.so.12 (.so.13 for CUDA
13), by soname: from the wheels these are found only once loaded into the process (CuPy
loads them as it uses cuBLAS and NVRTC); phase 2 must make sure they are before the first
algorithm search.

API
    version(), version_tuple(), cudart_version(), library_path(), is_available()
    Handle(stream=None)                       one per device and stream; .set_stream(s), .stream
    TensorDesc(n, h, w, c, dtype)             NHWC activations; .read_back()
    FilterDesc(cout, kh, kw, cin, dtype)      cuDNN's NHWC filter, KRSC = (Cout, KH, KW, Cin)
    ConvDesc(pad, stride, dilation=1, compute="float32", math="default")
    forward_output_dim(conv, x, w) -> (n, ho, wo, cout)
    find_{forward,backward_data,backward_filter}_algorithms(...)   timed on real buffers
    get_{forward,backward_data,backward_filter}_algorithms(...)    the heuristics
    {forward,backward_data,backward_filter}_workspace_size(...)
    convolution_forward / convolution_backward_data / convolution_backward_filter(...)
The last four groups take raw device pointers (ints) and descriptors; they check that the
descriptors are alive and the pointers non-NULL, nothing else: phase 2's launchers own the
shapes. dtype names: "float32", "float16", "bfloat16"; math names: "default", "tensor_op",
"tensor_op_allow_conversion", "fma". `PRECISIONS` maps the engine's precision modes to
(data dtype, compute dtype, math type).

Weight layout. cuDNN's filter descriptors take only two layouts, both with Cout outermost:
NCHW = KCRS (Cout, Cin, KH, KW) and NHWC = KRSC (Cout, KH, KW, Cin), and the legacy filter
descriptor has no strides. With NHWC activations cuDNN wants KRSC, so the engine keeps its
conv weights in that layout, OHWI = (Cout, KH, KW, Cin), everywhere (the flat buffers, the
bf16 working copy, torchvision I/O, checkpoints, the CPU path): no transpose per step.
engine.cudnn_conv is what calls this module.
"""
import importlib.util
import os
from collections import namedtuple

from libc.stdint cimport uintptr_t
from posix.dlfcn cimport RTLD_LOCAL, RTLD_NOW, dlerror, dlopen, dlsym

cdef extern from "cudnn_decls.h" nogil:
    int STATUS_SUCCESS "ENGINE_CUDNN_STATUS_SUCCESS"
    int DATA_FLOAT "ENGINE_CUDNN_DATA_FLOAT"
    int DATA_HALF "ENGINE_CUDNN_DATA_HALF"
    int DATA_BFLOAT16 "ENGINE_CUDNN_DATA_BFLOAT16"
    int TENSOR_NCHW "ENGINE_CUDNN_TENSOR_NCHW"
    int TENSOR_NHWC "ENGINE_CUDNN_TENSOR_NHWC"
    int DEFAULT_MATH "ENGINE_CUDNN_DEFAULT_MATH"
    int TENSOR_OP_MATH "ENGINE_CUDNN_TENSOR_OP_MATH"
    int TENSOR_OP_MATH_ALLOW_CONVERSION "ENGINE_CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION"
    int FMA_MATH "ENGINE_CUDNN_FMA_MATH"
    int MODE_CONVOLUTION "ENGINE_CUDNN_CONVOLUTION"
    int MODE_CROSS_CORRELATION "ENGINE_CUDNN_CROSS_CORRELATION"
    int FWD_ALGO_COUNT "ENGINE_CUDNN_CONVOLUTION_FWD_ALGO_COUNT"
    int BWD_FILTER_ALGO_COUNT "ENGINE_CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT"
    int BWD_DATA_ALGO_COUNT "ENGINE_CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT"

    ctypedef struct engine_cudnnContext:
        pass
    ctypedef struct engine_cudnnTensorStruct:
        pass
    ctypedef struct engine_cudnnFilterStruct:
        pass
    ctypedef struct engine_cudnnConvolutionStruct:
        pass
    ctypedef engine_cudnnContext* cudnnHandle_t
    ctypedef engine_cudnnTensorStruct* cudnnTensorDescriptor_t
    ctypedef engine_cudnnFilterStruct* cudnnFilterDescriptor_t
    ctypedef engine_cudnnConvolutionStruct* cudnnConvolutionDescriptor_t
    ctypedef void* cudaStream_t
    ctypedef int cudnnStatus_t

    ctypedef struct engine_cudnnAlgoPerf_t:
        int algo
        int status
        float time
        size_t memory
        int determinism
        int mathType

    ctypedef size_t (*cudnnGetVersion_t)()
    ctypedef size_t (*cudnnGetCudartVersion_t)()
    ctypedef const char* (*cudnnGetErrorString_t)(cudnnStatus_t)
    ctypedef void (*cudnnGetLastErrorString_t)(char*, size_t)
    ctypedef cudnnStatus_t (*cudnnCreate_t)(cudnnHandle_t*)
    ctypedef cudnnStatus_t (*cudnnDestroy_t)(cudnnHandle_t)
    ctypedef cudnnStatus_t (*cudnnSetStream_t)(cudnnHandle_t, cudaStream_t)
    ctypedef cudnnStatus_t (*cudnnGetStream_t)(cudnnHandle_t, cudaStream_t*)
    ctypedef cudnnStatus_t (*cudnnCreateTensorDescriptor_t)(cudnnTensorDescriptor_t*)
    ctypedef cudnnStatus_t (*cudnnDestroyTensorDescriptor_t)(cudnnTensorDescriptor_t)
    ctypedef cudnnStatus_t (*cudnnSetTensor4dDescriptor_t)(cudnnTensorDescriptor_t, int, int, int, int, int, int)
    ctypedef cudnnStatus_t (*cudnnGetTensor4dDescriptor_t)(cudnnTensorDescriptor_t, int*, int*, int*, int*, int*,
                                                           int*, int*, int*, int*)
    ctypedef cudnnStatus_t (*cudnnCreateFilterDescriptor_t)(cudnnFilterDescriptor_t*)
    ctypedef cudnnStatus_t (*cudnnDestroyFilterDescriptor_t)(cudnnFilterDescriptor_t)
    ctypedef cudnnStatus_t (*cudnnSetFilter4dDescriptor_t)(cudnnFilterDescriptor_t, int, int, int, int, int, int)
    ctypedef cudnnStatus_t (*cudnnGetFilter4dDescriptor_t)(cudnnFilterDescriptor_t, int*, int*, int*, int*, int*, int*)
    ctypedef cudnnStatus_t (*cudnnCreateConvolutionDescriptor_t)(cudnnConvolutionDescriptor_t*)
    ctypedef cudnnStatus_t (*cudnnDestroyConvolutionDescriptor_t)(cudnnConvolutionDescriptor_t)
    ctypedef cudnnStatus_t (*cudnnSetConvolution2dDescriptor_t)(cudnnConvolutionDescriptor_t, int, int, int, int,
                                                                int, int, int, int)
    ctypedef cudnnStatus_t (*cudnnGetConvolution2dDescriptor_t)(cudnnConvolutionDescriptor_t, int*, int*, int*,
                                                                int*, int*, int*, int*, int*)
    ctypedef cudnnStatus_t (*cudnnSetConvolutionMathType_t)(cudnnConvolutionDescriptor_t, int)
    ctypedef cudnnStatus_t (*cudnnGetConvolutionMathType_t)(cudnnConvolutionDescriptor_t, int*)
    ctypedef cudnnStatus_t (*cudnnGetConvolution2dForwardOutputDim_t)(cudnnConvolutionDescriptor_t,
                                                                      cudnnTensorDescriptor_t,
                                                                      cudnnFilterDescriptor_t,
                                                                      int*, int*, int*, int*)
    ctypedef cudnnStatus_t (*cudnnFindConvolutionForwardAlgorithmEx_t)(
        cudnnHandle_t, cudnnTensorDescriptor_t, const void*, cudnnFilterDescriptor_t, const void*,
        cudnnConvolutionDescriptor_t, cudnnTensorDescriptor_t, void*, int, int*, engine_cudnnAlgoPerf_t*,
        void*, size_t)
    ctypedef cudnnStatus_t (*cudnnFindConvolutionBackwardDataAlgorithmEx_t)(
        cudnnHandle_t, cudnnFilterDescriptor_t, const void*, cudnnTensorDescriptor_t, const void*,
        cudnnConvolutionDescriptor_t, cudnnTensorDescriptor_t, void*, int, int*, engine_cudnnAlgoPerf_t*,
        void*, size_t)
    ctypedef cudnnStatus_t (*cudnnFindConvolutionBackwardFilterAlgorithmEx_t)(
        cudnnHandle_t, cudnnTensorDescriptor_t, const void*, cudnnTensorDescriptor_t, const void*,
        cudnnConvolutionDescriptor_t, cudnnFilterDescriptor_t, void*, int, int*, engine_cudnnAlgoPerf_t*,
        void*, size_t)
    ctypedef cudnnStatus_t (*cudnnGetConvolutionForwardAlgorithm_v7_t)(
        cudnnHandle_t, cudnnTensorDescriptor_t, cudnnFilterDescriptor_t, cudnnConvolutionDescriptor_t,
        cudnnTensorDescriptor_t, int, int*, engine_cudnnAlgoPerf_t*)
    ctypedef cudnnStatus_t (*cudnnGetConvolutionBackwardDataAlgorithm_v7_t)(
        cudnnHandle_t, cudnnFilterDescriptor_t, cudnnTensorDescriptor_t, cudnnConvolutionDescriptor_t,
        cudnnTensorDescriptor_t, int, int*, engine_cudnnAlgoPerf_t*)
    ctypedef cudnnStatus_t (*cudnnGetConvolutionBackwardFilterAlgorithm_v7_t)(
        cudnnHandle_t, cudnnTensorDescriptor_t, cudnnTensorDescriptor_t, cudnnConvolutionDescriptor_t,
        cudnnFilterDescriptor_t, int, int*, engine_cudnnAlgoPerf_t*)
    ctypedef cudnnStatus_t (*cudnnGetConvolutionForwardWorkspaceSize_t)(
        cudnnHandle_t, cudnnTensorDescriptor_t, cudnnFilterDescriptor_t, cudnnConvolutionDescriptor_t,
        cudnnTensorDescriptor_t, int, size_t*)
    ctypedef cudnnStatus_t (*cudnnGetConvolutionBackwardDataWorkspaceSize_t)(
        cudnnHandle_t, cudnnFilterDescriptor_t, cudnnTensorDescriptor_t, cudnnConvolutionDescriptor_t,
        cudnnTensorDescriptor_t, int, size_t*)
    ctypedef cudnnStatus_t (*cudnnGetConvolutionBackwardFilterWorkspaceSize_t)(
        cudnnHandle_t, cudnnTensorDescriptor_t, cudnnTensorDescriptor_t, cudnnConvolutionDescriptor_t,
        cudnnFilterDescriptor_t, int, size_t*)
    ctypedef cudnnStatus_t (*cudnnConvolutionForward_t)(
        cudnnHandle_t, const void*, cudnnTensorDescriptor_t, const void*, cudnnFilterDescriptor_t, const void*,
        cudnnConvolutionDescriptor_t, int, void*, size_t, const void*, cudnnTensorDescriptor_t, void*)
    ctypedef cudnnStatus_t (*cudnnConvolutionBackwardData_t)(
        cudnnHandle_t, const void*, cudnnFilterDescriptor_t, const void*, cudnnTensorDescriptor_t, const void*,
        cudnnConvolutionDescriptor_t, int, void*, size_t, const void*, cudnnTensorDescriptor_t, void*)
    ctypedef cudnnStatus_t (*cudnnConvolutionBackwardFilter_t)(
        cudnnHandle_t, const void*, cudnnTensorDescriptor_t, const void*, cudnnTensorDescriptor_t, const void*,
        cudnnConvolutionDescriptor_t, int, void*, size_t, const void*, cudnnFilterDescriptor_t, void*)


LIBRARY_ENV = "ENGINE_CUDNN_LIBRARY"
LIBRARY_NAME = "libcudnn.so.9"
# Where the NVIDIA wheels put it, under the `nvidia` namespace package: nvidia-cudnn-cu12 and
# nvidia-cudnn-cu13 9.x both in cudnn/lib; cu13/lib is where the other CUDA 13 wheels go.
WHEEL_DIRS = ("cudnn/lib", "cu13/lib")

# cudnnStatus_t, cudnn_graph.h of cuDNN 9.28 (2001 is the deprecated CUDNN_STATUS_INVALID_VALUE;
# the other deprecated names alias codes listed here).
_STATUS_NAMES = {
    0: "CUDNN_STATUS_SUCCESS", 1001: "CUDNN_STATUS_NOT_INITIALIZED",
    1002: "CUDNN_STATUS_SUBLIBRARY_VERSION_MISMATCH", 1003: "CUDNN_STATUS_SERIALIZATION_VERSION_MISMATCH",
    1004: "CUDNN_STATUS_DEPRECATED", 1005: "CUDNN_STATUS_LICENSE_ERROR",
    1006: "CUDNN_STATUS_RUNTIME_IN_PROGRESS", 1007: "CUDNN_STATUS_RUNTIME_FP_OVERFLOW",
    1008: "CUDNN_STATUS_SUBLIBRARY_LOADING_FAILED",
    2000: "CUDNN_STATUS_BAD_PARAM", 2001: "CUDNN_STATUS_INVALID_VALUE",
    2002: "CUDNN_STATUS_BAD_PARAM_NULL_POINTER", 2003: "CUDNN_STATUS_BAD_PARAM_MISALIGNED_POINTER",
    2004: "CUDNN_STATUS_BAD_PARAM_NOT_FINALIZED", 2005: "CUDNN_STATUS_BAD_PARAM_OUT_OF_BOUND",
    2006: "CUDNN_STATUS_BAD_PARAM_SIZE_INSUFFICIENT", 2007: "CUDNN_STATUS_BAD_PARAM_STREAM_MISMATCH",
    2008: "CUDNN_STATUS_BAD_PARAM_SHAPE_MISMATCH", 2009: "CUDNN_STATUS_BAD_PARAM_DUPLICATED_ENTRIES",
    2010: "CUDNN_STATUS_BAD_PARAM_ATTRIBUTE_TYPE", 2011: "CUDNN_STATUS_BAD_PARAM_CUDA_GRAPH_MISMATCH",
    2012: "CUDNN_STATUS_BAD_PARAM_DESCRIPTOR_TYPE",
    3000: "CUDNN_STATUS_NOT_SUPPORTED", 3001: "CUDNN_STATUS_NOT_SUPPORTED_GRAPH_PATTERN",
    3002: "CUDNN_STATUS_NOT_SUPPORTED_SHAPE", 3003: "CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE",
    3004: "CUDNN_STATUS_NOT_SUPPORTED_LAYOUT", 3005: "CUDNN_STATUS_NOT_SUPPORTED_INCOMPATIBLE_CUDA_DRIVER",
    3006: "CUDNN_STATUS_NOT_SUPPORTED_INCOMPATIBLE_CUDART", 3007: "CUDNN_STATUS_NOT_SUPPORTED_ARCH_MISMATCH",
    3008: "CUDNN_STATUS_NOT_SUPPORTED_RUNTIME_PREREQUISITE_MISSING",
    3009: "CUDNN_STATUS_NOT_SUPPORTED_SUBLIBRARY_UNAVAILABLE",
    3010: "CUDNN_STATUS_NOT_SUPPORTED_SHARED_MEMORY_INSUFFICIENT", 3011: "CUDNN_STATUS_NOT_SUPPORTED_PADDING",
    3012: "CUDNN_STATUS_NOT_SUPPORTED_BAD_LAUNCH_PARAM", 3013: "CUDNN_STATUS_NOT_SUPPORTED_CUDA_GRAPH_NATIVE_API",
    3014: "CUDNN_STATUS_NOT_SUPPORTED_INVALID_DYNAMIC_SHAPE",
    4000: "CUDNN_STATUS_INTERNAL_ERROR", 4001: "CUDNN_STATUS_INTERNAL_ERROR_COMPILATION_FAILED",
    4002: "CUDNN_STATUS_INTERNAL_ERROR_UNEXPECTED_VALUE", 4003: "CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED",
    4004: "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED", 4005: "CUDNN_STATUS_INTERNAL_ERROR_BAD_LAUNCH_PARAM",
    4006: "CUDNN_STATUS_INTERNAL_ERROR_TEXTURE_CREATION_FAILED",
    5000: "CUDNN_STATUS_EXECUTION_FAILED", 5001: "CUDNN_STATUS_EXECUTION_FAILED_CUDA_DRIVER",
    5002: "CUDNN_STATUS_EXECUTION_FAILED_CUBLAS", 5003: "CUDNN_STATUS_EXECUTION_FAILED_CUDART",
    5004: "CUDNN_STATUS_EXECUTION_FAILED_CURAND",
}
# The status categories (cudnn_graph.h: CUDNN_STATUS_CATEGORY(code) = code / 1000 * 1000).
_CATEGORIES = {1000: "CUDNN_STATUS_NOT_INITIALIZED", 2000: "CUDNN_STATUS_BAD_PARAM",
               3000: "CUDNN_STATUS_NOT_SUPPORTED", 4000: "CUDNN_STATUS_INTERNAL_ERROR",
               5000: "CUDNN_STATUS_EXECUTION_FAILED"}

# name -> cudnnDataType_t (cudnn_graph.h), and bytes per element.
DTYPES = {"float32": DATA_FLOAT, "float16": DATA_HALF, "bfloat16": DATA_BFLOAT16}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
# name -> cudnnMathType_t (cudnn_graph.h).
MATH_TYPES = {"default": DEFAULT_MATH, "tensor_op": TENSOR_OP_MATH,
              "tensor_op_allow_conversion": TENSOR_OP_MATH_ALLOW_CONVERSION, "fma": FMA_MATH}
# name -> cudnnTensorFormat_t (cudnn_graph.h); cudnnConvolutionMode_t (cudnn_graph.h).
FORMATS = {"nchw": TENSOR_NCHW, "nhwc": TENSOR_NHWC}
MODES = {"convolution": MODE_CONVOLUTION, "cross_correlation": MODE_CROSS_CORRELATION}
# value -> name of cudnnConvolutionFwdAlgo_t, ...BwdDataAlgo_t, ...BwdFilterAlgo_t (cudnn_ops.h).
FWD_ALGOS = {0: "IMPLICIT_GEMM", 1: "IMPLICIT_PRECOMP_GEMM", 2: "GEMM", 3: "DIRECT", 4: "FFT",
             5: "FFT_TILING", 6: "WINOGRAD", 7: "WINOGRAD_NONFUSED"}
BWD_DATA_ALGOS = {0: "0", 1: "1", 2: "FFT", 3: "FFT_TILING", 4: "WINOGRAD", 5: "WINOGRAD_NONFUSED"}
BWD_FILTER_ALGOS = {0: "0", 1: "1", 2: "FFT", 3: "3", 4: "WINOGRAD", 5: "WINOGRAD_NONFUSED", 6: "FFT_TILING"}
assert len(FWD_ALGOS) == FWD_ALGO_COUNT and len(BWD_DATA_ALGOS) == BWD_DATA_ALGO_COUNT
assert len(BWD_FILTER_ALGOS) == BWD_FILTER_ALGO_COUNT

# The engine's precision modes (engine.gemm.PRECISIONS) -> (data dtype, compute dtype, math).
# fp32 must say "fma": with CUDNN_DEFAULT_MATH cuDNN may run float32 convolutions on TF32
# tensor cores (Ampere and later); tf32 and bf16 ask for the tensor cores explicitly.
PRECISIONS = {"fp32": ("float32", "float32", "fma"),
              "tf32": ("float32", "float32", "tensor_op"),
              "bf16": ("bfloat16", "float32", "tensor_op")}

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MATH_NAMES = {v: k for k, v in MATH_TYPES.items()}
_FORMAT_NAMES = {v: k for k, v in FORMATS.items()}
_MODE_NAMES = {v: k for k, v in MODES.items()}


def status_name(status):
    """cuDNN's name of a status code ("CUDNN_STATUS_BAD_PARAM"); an unknown code is named by
    its category, "CUDNN_STATUS_BAD_PARAM(2042)"."""
    status = int(status)
    if status in _STATUS_NAMES:
        return _STATUS_NAMES[status]
    category = _CATEGORIES.get(status // 1000 * 1000)
    return f"{category}({status})" if category else f"cudnnStatus({status})"


class CudnnError(RuntimeError):
    """A cuDNN call failed: `status` (int), `name` ("CUDNN_STATUS_BAD_PARAM", ...), `message`
    (cuDNN's description: cudnnGetErrorString's, then cudnnGetLastErrorString's, which names
    the failed check), `call` (the cuDNN function). Survives pickling."""

    def __init__(self, status, message="", call=""):
        self.status = int(status)
        self.name = status_name(self.status)
        self.message = str(message)
        self.call = str(call)
        where = f"{self.call}: " if self.call else ""
        super().__init__(f"{where}{self.name}: {self.message}" if self.message else f"{where}{self.name}")

    def __reduce__(self):
        return (type(self), (self.status, self.message, self.call))


class CudnnMissing(RuntimeError):
    """libcudnn.so.9 could not be loaded (or lacks a function); the message lists every place
    that was tried."""


AlgoPerf = namedtuple("AlgoPerf", "algo name status status_name time_ms workspace deterministic math")
AlgoPerf.__doc__ = ("One result of an algorithm search: the algorithm (code and name), its status, "
                    "its time in ms (Find only), its workspace in bytes, whether it is deterministic "
                    "and the math type it ran with.")


cdef struct Api:
    cudnnGetVersion_t get_version
    cudnnGetCudartVersion_t get_cudart_version
    cudnnGetErrorString_t get_error_string
    cudnnGetLastErrorString_t get_last_error_string      # optional
    cudnnCreate_t create
    cudnnDestroy_t destroy
    cudnnSetStream_t set_stream
    cudnnGetStream_t get_stream                          # optional
    cudnnCreateTensorDescriptor_t create_tensor
    cudnnDestroyTensorDescriptor_t destroy_tensor
    cudnnSetTensor4dDescriptor_t set_tensor4d
    cudnnGetTensor4dDescriptor_t get_tensor4d
    cudnnCreateFilterDescriptor_t create_filter
    cudnnDestroyFilterDescriptor_t destroy_filter
    cudnnSetFilter4dDescriptor_t set_filter4d
    cudnnGetFilter4dDescriptor_t get_filter4d
    cudnnCreateConvolutionDescriptor_t create_conv
    cudnnDestroyConvolutionDescriptor_t destroy_conv
    cudnnSetConvolution2dDescriptor_t set_conv2d
    cudnnGetConvolution2dDescriptor_t get_conv2d
    cudnnSetConvolutionMathType_t set_math
    cudnnGetConvolutionMathType_t get_math
    cudnnGetConvolution2dForwardOutputDim_t fwd_output_dim
    # The GPU-only calls: optional at load, looked up by name (a missing one raises
    # CudnnMissing when called).
    cudnnFindConvolutionForwardAlgorithmEx_t find_fwd
    cudnnFindConvolutionBackwardDataAlgorithmEx_t find_bwd_data
    cudnnFindConvolutionBackwardFilterAlgorithmEx_t find_bwd_filter
    cudnnGetConvolutionForwardAlgorithm_v7_t get_fwd
    cudnnGetConvolutionBackwardDataAlgorithm_v7_t get_bwd_data
    cudnnGetConvolutionBackwardFilterAlgorithm_v7_t get_bwd_filter
    cudnnGetConvolutionForwardWorkspaceSize_t ws_fwd
    cudnnGetConvolutionBackwardDataWorkspaceSize_t ws_bwd_data
    cudnnGetConvolutionBackwardFilterWorkspaceSize_t ws_bwd_filter
    cudnnConvolutionForward_t conv_fwd
    cudnnConvolutionBackwardData_t conv_bwd_data
    cudnnConvolutionBackwardFilter_t conv_bwd_filter

cdef Api _api
cdef void* _lib = NULL
cdef size_t _version = 0
_loaded_path = None
_load_failure = None
_missing_optional = []

REQUIRED_SYMBOLS = (
    "cudnnGetVersion", "cudnnGetErrorString", "cudnnCreate", "cudnnDestroy", "cudnnSetStream",
    "cudnnCreateTensorDescriptor", "cudnnDestroyTensorDescriptor", "cudnnSetTensor4dDescriptor",
    "cudnnGetTensor4dDescriptor", "cudnnCreateFilterDescriptor", "cudnnDestroyFilterDescriptor",
    "cudnnSetFilter4dDescriptor", "cudnnGetFilter4dDescriptor", "cudnnCreateConvolutionDescriptor",
    "cudnnDestroyConvolutionDescriptor", "cudnnSetConvolution2dDescriptor",
    "cudnnGetConvolution2dDescriptor", "cudnnSetConvolutionMathType", "cudnnGetConvolutionMathType",
    "cudnnGetConvolution2dForwardOutputDim")
OPTIONAL_SYMBOLS = (
    "cudnnGetLastErrorString", "cudnnGetCudartVersion", "cudnnGetStream",
    "cudnnFindConvolutionForwardAlgorithmEx", "cudnnFindConvolutionBackwardDataAlgorithmEx",
    "cudnnFindConvolutionBackwardFilterAlgorithmEx", "cudnnGetConvolutionForwardAlgorithm_v7",
    "cudnnGetConvolutionBackwardDataAlgorithm_v7", "cudnnGetConvolutionBackwardFilterAlgorithm_v7",
    "cudnnGetConvolutionForwardWorkspaceSize", "cudnnGetConvolutionBackwardDataWorkspaceSize",
    "cudnnGetConvolutionBackwardFilterWorkspaceSize", "cudnnConvolutionForward",
    "cudnnConvolutionBackwardData", "cudnnConvolutionBackwardFilter")


include "libload.pxi"


def _candidates():
    """Paths to try, in order (see the module docstring)."""
    return _library_candidates(LIBRARY_ENV, WHEEL_DIRS, LIBRARY_NAME)


cdef void* _symbol(void* lib, str name, bint required) except? NULL:
    cdef bytes bname = name.encode()
    cdef void* fn = dlsym(lib, bname)
    if fn == NULL:
        if required:
            raise CudnnMissing(f"{_loaded_path} has no symbol {name}: not a cuDNN 9 library")
        _missing_optional.append(name)
    return fn


cdef int _load() except -1:
    """Open libcudnn once; afterwards raise the same CudnnMissing on every call."""
    global _lib, _loaded_path, _load_failure, _version
    if _lib != NULL:
        return 0
    if _load_failure is not None:
        raise CudnnMissing(_load_failure)
    tried, opened = [], []
    cdef size_t v = 0
    cdef void* lib = _open_first(_candidates(), tried, opened)
    if lib == NULL:
        _load_failure = ("cuDNN is not available: libcudnn.so.9 could not be loaded from\n"
                         + "\n".join(tried)
                         + "\nInstall it with `pip install nvidia-cudnn-cu12` (the 'test' extra; nvidia-cudnn-cu13 "
                         f"for CUDA 13), or set {LIBRARY_ENV} to the library's path.")
        raise CudnnMissing(_load_failure)
    _loaded_path = opened[0]
    try:
        _resolve(lib)
        with nogil:
            v = _api.get_version()
        if v // 10000 != 9:
            raise CudnnMissing(f"{_loaded_path} is cuDNN version {v}, this binding needs 9.x")
    except CudnnMissing as e:
        _load_failure = str(e)
        raise
    _version = v
    _lib = lib
    return 0


cdef int _resolve(void* lib) except -1:
    del _missing_optional[:]
    _api.get_version = <cudnnGetVersion_t>_symbol(lib, "cudnnGetVersion", True)
    _api.get_error_string = <cudnnGetErrorString_t>_symbol(lib, "cudnnGetErrorString", True)
    _api.create = <cudnnCreate_t>_symbol(lib, "cudnnCreate", True)
    _api.destroy = <cudnnDestroy_t>_symbol(lib, "cudnnDestroy", True)
    _api.set_stream = <cudnnSetStream_t>_symbol(lib, "cudnnSetStream", True)
    _api.create_tensor = <cudnnCreateTensorDescriptor_t>_symbol(lib, "cudnnCreateTensorDescriptor", True)
    _api.destroy_tensor = <cudnnDestroyTensorDescriptor_t>_symbol(lib, "cudnnDestroyTensorDescriptor", True)
    _api.set_tensor4d = <cudnnSetTensor4dDescriptor_t>_symbol(lib, "cudnnSetTensor4dDescriptor", True)
    _api.get_tensor4d = <cudnnGetTensor4dDescriptor_t>_symbol(lib, "cudnnGetTensor4dDescriptor", True)
    _api.create_filter = <cudnnCreateFilterDescriptor_t>_symbol(lib, "cudnnCreateFilterDescriptor", True)
    _api.destroy_filter = <cudnnDestroyFilterDescriptor_t>_symbol(lib, "cudnnDestroyFilterDescriptor", True)
    _api.set_filter4d = <cudnnSetFilter4dDescriptor_t>_symbol(lib, "cudnnSetFilter4dDescriptor", True)
    _api.get_filter4d = <cudnnGetFilter4dDescriptor_t>_symbol(lib, "cudnnGetFilter4dDescriptor", True)
    _api.create_conv = <cudnnCreateConvolutionDescriptor_t>_symbol(lib, "cudnnCreateConvolutionDescriptor", True)
    _api.destroy_conv = <cudnnDestroyConvolutionDescriptor_t>_symbol(lib, "cudnnDestroyConvolutionDescriptor", True)
    _api.set_conv2d = <cudnnSetConvolution2dDescriptor_t>_symbol(lib, "cudnnSetConvolution2dDescriptor", True)
    _api.get_conv2d = <cudnnGetConvolution2dDescriptor_t>_symbol(lib, "cudnnGetConvolution2dDescriptor", True)
    _api.set_math = <cudnnSetConvolutionMathType_t>_symbol(lib, "cudnnSetConvolutionMathType", True)
    _api.get_math = <cudnnGetConvolutionMathType_t>_symbol(lib, "cudnnGetConvolutionMathType", True)
    _api.fwd_output_dim = <cudnnGetConvolution2dForwardOutputDim_t>_symbol(
        lib, "cudnnGetConvolution2dForwardOutputDim", True)
    _api.get_last_error_string = <cudnnGetLastErrorString_t>_symbol(lib, "cudnnGetLastErrorString", False)
    _api.get_cudart_version = <cudnnGetCudartVersion_t>_symbol(lib, "cudnnGetCudartVersion", False)
    _api.get_stream = <cudnnGetStream_t>_symbol(lib, "cudnnGetStream", False)
    _api.find_fwd = <cudnnFindConvolutionForwardAlgorithmEx_t>_symbol(
        lib, "cudnnFindConvolutionForwardAlgorithmEx", False)
    _api.find_bwd_data = <cudnnFindConvolutionBackwardDataAlgorithmEx_t>_symbol(
        lib, "cudnnFindConvolutionBackwardDataAlgorithmEx", False)
    _api.find_bwd_filter = <cudnnFindConvolutionBackwardFilterAlgorithmEx_t>_symbol(
        lib, "cudnnFindConvolutionBackwardFilterAlgorithmEx", False)
    _api.get_fwd = <cudnnGetConvolutionForwardAlgorithm_v7_t>_symbol(
        lib, "cudnnGetConvolutionForwardAlgorithm_v7", False)
    _api.get_bwd_data = <cudnnGetConvolutionBackwardDataAlgorithm_v7_t>_symbol(
        lib, "cudnnGetConvolutionBackwardDataAlgorithm_v7", False)
    _api.get_bwd_filter = <cudnnGetConvolutionBackwardFilterAlgorithm_v7_t>_symbol(
        lib, "cudnnGetConvolutionBackwardFilterAlgorithm_v7", False)
    _api.ws_fwd = <cudnnGetConvolutionForwardWorkspaceSize_t>_symbol(
        lib, "cudnnGetConvolutionForwardWorkspaceSize", False)
    _api.ws_bwd_data = <cudnnGetConvolutionBackwardDataWorkspaceSize_t>_symbol(
        lib, "cudnnGetConvolutionBackwardDataWorkspaceSize", False)
    _api.ws_bwd_filter = <cudnnGetConvolutionBackwardFilterWorkspaceSize_t>_symbol(
        lib, "cudnnGetConvolutionBackwardFilterWorkspaceSize", False)
    _api.conv_fwd = <cudnnConvolutionForward_t>_symbol(lib, "cudnnConvolutionForward", False)
    _api.conv_bwd_data = <cudnnConvolutionBackwardData_t>_symbol(lib, "cudnnConvolutionBackwardData", False)
    _api.conv_bwd_filter = <cudnnConvolutionBackwardFilter_t>_symbol(lib, "cudnnConvolutionBackwardFilter", False)
    return 0


cdef str _last_error():
    """cudnnGetLastErrorString's text ("" when absent); reading it clears it."""
    cdef char buf[1024]
    if _api.get_last_error_string == NULL:
        return ""
    buf[0] = 0
    _api.get_last_error_string(buf, sizeof(buf))
    buf[sizeof(buf) - 1] = 0
    return (<bytes>buf).decode(errors="replace").strip()


cdef int _check(cudnnStatus_t status, str call) except -1:
    if status != STATUS_SUCCESS:
        raise _error(status, call)
    return 0


cdef object _error(cudnnStatus_t status, str call):
    """The CudnnError of a failed call: read right after it, before any other cuDNN call
    (cudnnGetLastErrorString reports the most recent failure)."""
    cdef const char* text = _api.get_error_string(status)
    described = text.decode(errors="replace") if text != NULL else ""
    parts = [described] if described and described != status_name(status) else []
    detail = _last_error()
    if detail:
        parts.append(detail)
    return CudnnError(status, "; ".join(parts), call)


cdef void _ignore(cudnnStatus_t status) noexcept:
    """For calls whose failure cannot be raised (destructors): clear the message it left, so
    that it is not reported with a later error."""
    cdef char buf[8]
    if status != STATUS_SUCCESS and _api.get_last_error_string != NULL:
        _api.get_last_error_string(buf, sizeof(buf))


cdef int _absent(str name) except -1:
    raise CudnnMissing(f"{_loaded_path} has no symbol {name} (a cuDNN 9 library without the legacy convolution API?)")


def is_available():
    """True when libcudnn.so.9 loads (says nothing about GPUs)."""
    try:
        _load()
    except CudnnMissing:
        return False
    return True


def library_path():
    """The path libcudnn.so.9 was loaded from (loads it if needed)."""
    _load()
    return _loaded_path


def version():
    """cuDNN's version code, MAJOR*10000 + MINOR*100 + PATCH (92800 for 9.28.0)."""
    _load()
    return int(_version)


def version_tuple():
    v = version()
    return (v // 10000, (v % 10000) // 100, v % 100)


def cudart_version():
    """The CUDA runtime version cuDNN was built against (12090 for 12.9), or None if unknown."""
    _load()
    if _api.get_cudart_version == NULL:
        return None
    cdef size_t v
    with nogil:
        v = _api.get_cudart_version()
    return int(v)


def missing_symbols():
    """The optional functions this library lacks (their wrappers raise CudnnMissing)."""
    _load()
    return list(_missing_optional)


def status_string(int status):
    """cudnnGetErrorString(status), from the library."""
    _load()
    cdef const char* text = _api.get_error_string(status)
    return text.decode(errors="replace") if text != NULL else ""


cdef int _dtype(name) except -1:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise TypeError(f"cuDNN dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


cdef int _math(name) except -1:
    try:
        return MATH_TYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"cuDNN math type must be one of {sorted(MATH_TYPES)}, got {name!r}") from None


def _pair(value, what):
    if isinstance(value, int):
        return value, value
    try:
        a, b = value
        return int(a), int(b)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be an int or a pair of ints, got {value!r}") from None


cdef cudaStream_t _stream(stream) except? NULL:
    """None or 0 (the legacy default stream), an integer handle, or an object with `.ptr`."""
    if stream is None:
        return NULL
    handle = getattr(stream, "ptr", stream)
    return <cudaStream_t><uintptr_t>int(handle)


cdef void* _dev(ptr, str what) except NULL:
    """A device pointer (an int) that must not be NULL."""
    cdef uintptr_t p = <uintptr_t>int(ptr)
    if p == 0:
        raise ValueError(f"{what}: NULL device pointer")
    return <void*>p


cdef class Handle:
    """A cuDNN handle: bound to the device that is current when it is created, its work
    queued on `stream` (None: the legacy default stream). One per device and stream; needs
    a GPU (cudnnCreate fails with CUDNN_STATUS_NOT_INITIALIZED without one)."""

    cdef cudnnHandle_t _h
    cdef object _stream_value

    def __cinit__(self):
        self._h = NULL

    def __init__(self, stream=None):
        _load()
        cdef cudnnHandle_t h = NULL
        cdef cudnnStatus_t status
        with nogil:
            status = _api.create(&h)
        _check(status, "cudnnCreate")
        self._h = h
        self._stream_value = 0
        if stream is not None:
            self.set_stream(stream)

    cdef cudnnHandle_t _live(self) except NULL:
        if self._h == NULL:
            raise ValueError("this cuDNN handle was destroyed")
        return self._h

    def set_stream(self, stream):
        cdef cudnnHandle_t h = self._live()
        cdef cudaStream_t s = _stream(stream)
        cdef cudnnStatus_t status
        with nogil:
            status = _api.set_stream(h, s)
        _check(status, "cudnnSetStream")
        self._stream_value = <uintptr_t>s

    @property
    def stream(self):
        """The stream's handle as an int (read back with cudnnGetStream when present)."""
        cdef cudnnHandle_t h = self._live()
        cdef cudaStream_t s = NULL
        cdef cudnnStatus_t status
        if _api.get_stream == NULL:
            return self._stream_value
        with nogil:
            status = _api.get_stream(h, &s)
        _check(status, "cudnnGetStream")
        return <uintptr_t>s

    @property
    def ptr(self):
        return <uintptr_t>self._h

    @property
    def alive(self):
        return self._h != NULL

    def destroy(self):
        """Free the handle; a second call does nothing."""
        cdef cudnnHandle_t h = self._h
        self._h = NULL
        if h == NULL:
            return
        cdef cudnnStatus_t status
        with nogil:
            status = _api.destroy(h)
        _check(status, "cudnnDestroy")

    def __dealloc__(self):
        cdef cudnnStatus_t status
        if self._h != NULL and _lib != NULL:
            with nogil:
                status = _api.destroy(self._h)
            _ignore(status)
            self._h = NULL


cdef class TensorDesc:
    """A 4-d NHWC tensor descriptor (cudnnSetTensor4dDescriptor with CUDNN_TENSOR_NHWC):
    fully packed, channels innermost, as the engine's activations are."""

    cdef cudnnTensorDescriptor_t _d
    cdef readonly int n, h, w, c
    cdef readonly str dtype

    def __cinit__(self):
        self._d = NULL

    def __init__(self, int n, int h, int w, int c, dtype="float32"):
        _load()
        cdef int code = _dtype(dtype)
        cdef cudnnTensorDescriptor_t d = NULL
        cdef cudnnStatus_t status
        with nogil:
            status = _api.create_tensor(&d)
        _check(status, "cudnnCreateTensorDescriptor")
        self._d = d
        with nogil:
            status = _api.set_tensor4d(d, TENSOR_NHWC, code, n, c, h, w)
        if status != STATUS_SUCCESS:
            err = _error(status, "cudnnSetTensor4dDescriptor")
            self.destroy()
            raise err
        self.n, self.h, self.w, self.c, self.dtype = n, h, w, c, dtype

    cdef cudnnTensorDescriptor_t _live(self) except NULL:
        if self._d == NULL:
            raise ValueError("this cuDNN tensor descriptor was destroyed")
        return self._d

    @property
    def shape(self):
        """(N, H, W, C), as set."""
        return (self.n, self.h, self.w, self.c)

    def read_back(self):
        """What cuDNN holds (cudnnGetTensor4dDescriptor), in NHWC order: {"dtype",
        "shape": (n, h, w, c), "strides": (n, h, w, c strides in elements)}."""
        cdef cudnnTensorDescriptor_t d = self._live()
        cdef int code = -1, n = 0, c = 0, h = 0, w = 0, sn = 0, sc = 0, sh = 0, sw = 0
        cdef cudnnStatus_t status
        with nogil:
            status = _api.get_tensor4d(d, &code, &n, &c, &h, &w, &sn, &sc, &sh, &sw)
        _check(status, "cudnnGetTensor4dDescriptor")
        return {"dtype": _DTYPE_NAMES.get(code, code), "shape": (n, h, w, c), "strides": (sn, sh, sw, sc)}

    @property
    def ptr(self):
        return <uintptr_t>self._d

    @property
    def alive(self):
        return self._d != NULL

    def destroy(self):
        cdef cudnnTensorDescriptor_t d = self._d
        self._d = NULL
        if d == NULL:
            return
        cdef cudnnStatus_t status
        with nogil:
            status = _api.destroy_tensor(d)
        _check(status, "cudnnDestroyTensorDescriptor")

    def __dealloc__(self):
        cdef cudnnStatus_t status
        if self._d != NULL and _lib != NULL:
            with nogil:
                status = _api.destroy_tensor(self._d)
            _ignore(status)
            self._d = NULL

    def __repr__(self):
        return f"TensorDesc(n={self.n}, h={self.h}, w={self.w}, c={self.c}, dtype={self.dtype!r})"


cdef class FilterDesc:
    """A 4-d filter descriptor in cuDNN's NHWC filter format, KRSC = (Cout, KH, KW, Cin)
    (cudnnSetFilter4dDescriptor with CUDNN_TENSOR_NHWC): the engine's OHWI conv weights."""

    cdef cudnnFilterDescriptor_t _d
    cdef readonly int cout, kh, kw, cin
    cdef readonly str dtype

    def __cinit__(self):
        self._d = NULL

    def __init__(self, int cout, int kh, int kw, int cin, dtype="float32"):
        _load()
        cdef int code = _dtype(dtype)
        cdef cudnnFilterDescriptor_t d = NULL
        cdef cudnnStatus_t status
        with nogil:
            status = _api.create_filter(&d)
        _check(status, "cudnnCreateFilterDescriptor")
        self._d = d
        with nogil:
            status = _api.set_filter4d(d, code, TENSOR_NHWC, cout, cin, kh, kw)
        if status != STATUS_SUCCESS:
            err = _error(status, "cudnnSetFilter4dDescriptor")
            self.destroy()
            raise err
        self.cout, self.kh, self.kw, self.cin, self.dtype = cout, kh, kw, cin, dtype

    cdef cudnnFilterDescriptor_t _live(self) except NULL:
        if self._d == NULL:
            raise ValueError("this cuDNN filter descriptor was destroyed")
        return self._d

    @property
    def shape(self):
        """(Cout, KH, KW, Cin): the memory layout cuDNN reads."""
        return (self.cout, self.kh, self.kw, self.cin)

    def read_back(self):
        """What cuDNN holds (cudnnGetFilter4dDescriptor): {"dtype", "format",
        "shape": (cout, kh, kw, cin)}."""
        cdef cudnnFilterDescriptor_t d = self._live()
        cdef int code = -1, fmt = -1, k = 0, c = 0, h = 0, w = 0
        cdef cudnnStatus_t status
        with nogil:
            status = _api.get_filter4d(d, &code, &fmt, &k, &c, &h, &w)
        _check(status, "cudnnGetFilter4dDescriptor")
        return {"dtype": _DTYPE_NAMES.get(code, code), "format": _FORMAT_NAMES.get(fmt, fmt),
                "shape": (k, h, w, c)}

    @property
    def ptr(self):
        return <uintptr_t>self._d

    @property
    def alive(self):
        return self._d != NULL

    def destroy(self):
        cdef cudnnFilterDescriptor_t d = self._d
        self._d = NULL
        if d == NULL:
            return
        cdef cudnnStatus_t status
        with nogil:
            status = _api.destroy_filter(d)
        _check(status, "cudnnDestroyFilterDescriptor")

    def __dealloc__(self):
        cdef cudnnStatus_t status
        if self._d != NULL and _lib != NULL:
            with nogil:
                status = _api.destroy_filter(self._d)
            _ignore(status)
            self._d = NULL

    def __repr__(self):
        return (f"FilterDesc(cout={self.cout}, kh={self.kh}, kw={self.kw}, cin={self.cin}, "
                f"dtype={self.dtype!r})")


cdef class ConvDesc:
    """A 2-d convolution descriptor: cross-correlation (what deep learning calls a
    convolution), `pad`, `stride`, `dilation` (each an int or an (h, w) pair), the
    accumulation dtype `compute` and the math type, both set explicitly."""

    cdef cudnnConvolutionDescriptor_t _d
    cdef readonly tuple pad, stride, dilation
    cdef readonly str compute, math

    def __cinit__(self):
        self._d = NULL

    def __init__(self, pad, stride, dilation=1, compute="float32", math="default"):
        _load()
        cdef int ph, pw, sh, sw, dh, dw
        ph, pw = _pair(pad, "pad")
        sh, sw = _pair(stride, "stride")
        dh, dw = _pair(dilation, "dilation")
        cdef int code = _dtype(compute)
        cdef int math_code = _math(math)
        cdef cudnnConvolutionDescriptor_t d = NULL
        cdef cudnnStatus_t status
        with nogil:
            status = _api.create_conv(&d)
        _check(status, "cudnnCreateConvolutionDescriptor")
        self._d = d
        call = "cudnnSetConvolution2dDescriptor"
        with nogil:
            status = _api.set_conv2d(d, ph, pw, sh, sw, dh, dw, MODE_CROSS_CORRELATION, code)
        if status == STATUS_SUCCESS:
            call = "cudnnSetConvolutionMathType"
            with nogil:
                status = _api.set_math(d, math_code)
        if status != STATUS_SUCCESS:
            err = _error(status, call)
            self.destroy()
            raise err
        self.pad, self.stride, self.dilation = (ph, pw), (sh, sw), (dh, dw)
        self.compute, self.math = compute, math

    cdef cudnnConvolutionDescriptor_t _live(self) except NULL:
        if self._d == NULL:
            raise ValueError("this cuDNN convolution descriptor was destroyed")
        return self._d

    def read_back(self):
        """What cuDNN holds (cudnnGetConvolution2dDescriptor, cudnnGetConvolutionMathType):
        {"pad", "stride", "dilation" (pairs), "mode", "compute", "math"}."""
        cdef cudnnConvolutionDescriptor_t d = self._live()
        cdef int ph = 0, pw = 0, sh = 0, sw = 0, dh = 0, dw = 0, mode = -1, code = -1, math_code = -1
        cdef cudnnStatus_t status
        with nogil:
            status = _api.get_conv2d(d, &ph, &pw, &sh, &sw, &dh, &dw, &mode, &code)
        _check(status, "cudnnGetConvolution2dDescriptor")
        with nogil:
            status = _api.get_math(d, &math_code)
        _check(status, "cudnnGetConvolutionMathType")
        return {"pad": (ph, pw), "stride": (sh, sw), "dilation": (dh, dw),
                "mode": _MODE_NAMES.get(mode, mode), "compute": _DTYPE_NAMES.get(code, code),
                "math": _MATH_NAMES.get(math_code, math_code)}

    @property
    def ptr(self):
        return <uintptr_t>self._d

    @property
    def alive(self):
        return self._d != NULL

    def destroy(self):
        cdef cudnnConvolutionDescriptor_t d = self._d
        self._d = NULL
        if d == NULL:
            return
        cdef cudnnStatus_t status
        with nogil:
            status = _api.destroy_conv(d)
        _check(status, "cudnnDestroyConvolutionDescriptor")

    def __dealloc__(self):
        cdef cudnnStatus_t status
        if self._d != NULL and _lib != NULL:
            with nogil:
                status = _api.destroy_conv(self._d)
            _ignore(status)
            self._d = NULL

    def __repr__(self):
        return (f"ConvDesc(pad={self.pad}, stride={self.stride}, dilation={self.dilation}, "
                f"compute={self.compute!r}, math={self.math!r})")


def forward_output_dim(ConvDesc conv not None, TensorDesc x not None, FilterDesc w not None):
    """The forward output's shape, (N, Ho, Wo, Cout), from cudnnGetConvolution2dForwardOutputDim
    (cuDNN returns n, c, h, w; reordered to NHWC here)."""
    cdef cudnnConvolutionDescriptor_t cd = conv._live()
    cdef cudnnTensorDescriptor_t xd = x._live()
    cdef cudnnFilterDescriptor_t wd = w._live()
    cdef int n = 0, c = 0, h = 0, wo = 0
    cdef cudnnStatus_t status
    with nogil:
        status = _api.fwd_output_dim(cd, xd, wd, &n, &c, &h, &wo)
    _check(status, "cudnnGetConvolution2dForwardOutputDim")
    return (n, h, wo, c)


# ---- GPU only: everything below takes a Handle ---------------------------------------------

cdef list _perf_list(engine_cudnnAlgoPerf_t* perf, int returned, dict names):
    cdef engine_cudnnAlgoPerf_t p
    out = []
    for i in range(returned):
        p = perf[i]
        out.append(AlgoPerf(int(p.algo), names.get(p.algo, str(p.algo)), int(p.status),
                            status_name(p.status), float(p.time), int(p.memory),
                            bool(p.determinism == 1), _MATH_NAMES.get(p.mathType, p.mathType)))
    return out


cdef int _count(count, int most) except -1:
    cdef int n = int(count)
    if not 1 <= n <= most:
        raise ValueError(f"requested algorithm count must be in 1..{most}, got {n}")
    return n


def find_forward_algorithms(Handle handle not None, TensorDesc x not None, x_ptr, FilterDesc w not None, w_ptr,
                            ConvDesc conv not None, TensorDesc y not None, y_ptr, workspace_ptr=0,
                            workspace_bytes=0, count=FWD_ALGO_COUNT):
    """cudnnFindConvolutionForwardAlgorithmEx: runs every forward algorithm on these buffers
    (y is overwritten) within `workspace_bytes`; a list of AlgoPerf, fastest first."""
    if _api.find_fwd == NULL:
        _absent("cudnnFindConvolutionForwardAlgorithmEx")
    cdef cudnnHandle_t h = handle._live()
    cdef cudnnTensorDescriptor_t xd = x._live(), yd = y._live()
    cdef cudnnFilterDescriptor_t wd = w._live()
    cdef cudnnConvolutionDescriptor_t cd = conv._live()
    cdef const void* xp = _dev(x_ptr, "x")
    cdef const void* wp = _dev(w_ptr, "w")
    cdef void* yp = _dev(y_ptr, "y")
    cdef void* ws = <void*><uintptr_t>int(workspace_ptr)
    cdef size_t wsb = int(workspace_bytes)
    cdef int requested = _count(count, FWD_ALGO_COUNT), returned = 0
    cdef engine_cudnnAlgoPerf_t perf[16]
    cdef cudnnStatus_t status
    with nogil:
        status = _api.find_fwd(h, xd, xp, wd, wp, cd, yd, yp, requested, &returned, perf, ws, wsb)
    _check(status, "cudnnFindConvolutionForwardAlgorithmEx")
    return _perf_list(perf, returned, FWD_ALGOS)


def find_backward_data_algorithms(Handle handle not None, FilterDesc w not None, w_ptr, TensorDesc dy not None,
                                  dy_ptr, ConvDesc conv not None, TensorDesc dx not None, dx_ptr,
                                  workspace_ptr=0, workspace_bytes=0, count=BWD_DATA_ALGO_COUNT):
    """cudnnFindConvolutionBackwardDataAlgorithmEx (dx is overwritten); AlgoPerf list, fastest first."""
    if _api.find_bwd_data == NULL:
        _absent("cudnnFindConvolutionBackwardDataAlgorithmEx")
    cdef cudnnHandle_t h = handle._live()
    cdef cudnnFilterDescriptor_t wd = w._live()
    cdef cudnnTensorDescriptor_t dyd = dy._live(), dxd = dx._live()
    cdef cudnnConvolutionDescriptor_t cd = conv._live()
    cdef const void* wp = _dev(w_ptr, "w")
    cdef const void* dyp = _dev(dy_ptr, "dy")
    cdef void* dxp = _dev(dx_ptr, "dx")
    cdef void* ws = <void*><uintptr_t>int(workspace_ptr)
    cdef size_t wsb = int(workspace_bytes)
    cdef int requested = _count(count, BWD_DATA_ALGO_COUNT), returned = 0
    cdef engine_cudnnAlgoPerf_t perf[16]
    cdef cudnnStatus_t status
    with nogil:
        status = _api.find_bwd_data(h, wd, wp, dyd, dyp, cd, dxd, dxp, requested, &returned, perf, ws, wsb)
    _check(status, "cudnnFindConvolutionBackwardDataAlgorithmEx")
    return _perf_list(perf, returned, BWD_DATA_ALGOS)


def find_backward_filter_algorithms(Handle handle not None, TensorDesc x not None, x_ptr, TensorDesc dy not None,
                                    dy_ptr, ConvDesc conv not None, FilterDesc dw not None, dw_ptr,
                                    workspace_ptr=0, workspace_bytes=0, count=BWD_FILTER_ALGO_COUNT):
    """cudnnFindConvolutionBackwardFilterAlgorithmEx (dw is overwritten); AlgoPerf list, fastest first."""
    if _api.find_bwd_filter == NULL:
        _absent("cudnnFindConvolutionBackwardFilterAlgorithmEx")
    cdef cudnnHandle_t h = handle._live()
    cdef cudnnTensorDescriptor_t xd = x._live(), dyd = dy._live()
    cdef cudnnFilterDescriptor_t dwd = dw._live()
    cdef cudnnConvolutionDescriptor_t cd = conv._live()
    cdef const void* xp = _dev(x_ptr, "x")
    cdef const void* dyp = _dev(dy_ptr, "dy")
    cdef void* dwp = _dev(dw_ptr, "dw")
    cdef void* ws = <void*><uintptr_t>int(workspace_ptr)
    cdef size_t wsb = int(workspace_bytes)
    cdef int requested = _count(count, BWD_FILTER_ALGO_COUNT), returned = 0
    cdef engine_cudnnAlgoPerf_t perf[16]
    cdef cudnnStatus_t status
    with nogil:
        status = _api.find_bwd_filter(h, xd, xp, dyd, dyp, cd, dwd, dwp, requested, &returned, perf, ws, wsb)
    _check(status, "cudnnFindConvolutionBackwardFilterAlgorithmEx")
    return _perf_list(perf, returned, BWD_FILTER_ALGOS)


def get_forward_algorithms(Handle handle not None, TensorDesc x not None, FilterDesc w not None,
                           ConvDesc conv not None, TensorDesc y not None, count=FWD_ALGO_COUNT):
    """cudnnGetConvolutionForwardAlgorithm_v7: the heuristics' ranking, nothing is run."""
    if _api.get_fwd == NULL:
        _absent("cudnnGetConvolutionForwardAlgorithm_v7")
    cdef cudnnHandle_t h = handle._live()
    cdef cudnnTensorDescriptor_t xd = x._live(), yd = y._live()
    cdef cudnnFilterDescriptor_t wd = w._live()
    cdef cudnnConvolutionDescriptor_t cd = conv._live()
    cdef int requested = _count(count, FWD_ALGO_COUNT), returned = 0
    cdef engine_cudnnAlgoPerf_t perf[16]
    cdef cudnnStatus_t status
    with nogil:
        status = _api.get_fwd(h, xd, wd, cd, yd, requested, &returned, perf)
    _check(status, "cudnnGetConvolutionForwardAlgorithm_v7")
    return _perf_list(perf, returned, FWD_ALGOS)


def get_backward_data_algorithms(Handle handle not None, FilterDesc w not None, TensorDesc dy not None,
                                 ConvDesc conv not None, TensorDesc dx not None, count=BWD_DATA_ALGO_COUNT):
    """cudnnGetConvolutionBackwardDataAlgorithm_v7: the heuristics' ranking."""
    if _api.get_bwd_data == NULL:
        _absent("cudnnGetConvolutionBackwardDataAlgorithm_v7")
    cdef cudnnHandle_t h = handle._live()
    cdef cudnnFilterDescriptor_t wd = w._live()
    cdef cudnnTensorDescriptor_t dyd = dy._live(), dxd = dx._live()
    cdef cudnnConvolutionDescriptor_t cd = conv._live()
    cdef int requested = _count(count, BWD_DATA_ALGO_COUNT), returned = 0
    cdef engine_cudnnAlgoPerf_t perf[16]
    cdef cudnnStatus_t status
    with nogil:
        status = _api.get_bwd_data(h, wd, dyd, cd, dxd, requested, &returned, perf)
    _check(status, "cudnnGetConvolutionBackwardDataAlgorithm_v7")
    return _perf_list(perf, returned, BWD_DATA_ALGOS)


def get_backward_filter_algorithms(Handle handle not None, TensorDesc x not None, TensorDesc dy not None,
                                   ConvDesc conv not None, FilterDesc dw not None, count=BWD_FILTER_ALGO_COUNT):
    """cudnnGetConvolutionBackwardFilterAlgorithm_v7: the heuristics' ranking."""
    if _api.get_bwd_filter == NULL:
        _absent("cudnnGetConvolutionBackwardFilterAlgorithm_v7")
    cdef cudnnHandle_t h = handle._live()
    cdef cudnnTensorDescriptor_t xd = x._live(), dyd = dy._live()
    cdef cudnnFilterDescriptor_t dwd = dw._live()
    cdef cudnnConvolutionDescriptor_t cd = conv._live()
    cdef int requested = _count(count, BWD_FILTER_ALGO_COUNT), returned = 0
    cdef engine_cudnnAlgoPerf_t perf[16]
    cdef cudnnStatus_t status
    with nogil:
        status = _api.get_bwd_filter(h, xd, dyd, cd, dwd, requested, &returned, perf)
    _check(status, "cudnnGetConvolutionBackwardFilterAlgorithm_v7")
    return _perf_list(perf, returned, BWD_FILTER_ALGOS)


def forward_workspace_size(Handle handle not None, TensorDesc x not None, FilterDesc w not None,
                           ConvDesc conv not None, TensorDesc y not None, int algo):
    """Bytes of workspace forward algorithm `algo` needs (cudnnGetConvolutionForwardWorkspaceSize)."""
    if _api.ws_fwd == NULL:
        _absent("cudnnGetConvolutionForwardWorkspaceSize")
    cdef cudnnHandle_t h = handle._live()
    cdef cudnnTensorDescriptor_t xd = x._live(), yd = y._live()
    cdef cudnnFilterDescriptor_t wd = w._live()
    cdef cudnnConvolutionDescriptor_t cd = conv._live()
    cdef size_t size = 0
    cdef cudnnStatus_t status
    with nogil:
        status = _api.ws_fwd(h, xd, wd, cd, yd, algo, &size)
    _check(status, "cudnnGetConvolutionForwardWorkspaceSize")
    return int(size)


def backward_data_workspace_size(Handle handle not None, FilterDesc w not None, TensorDesc dy not None,
                                 ConvDesc conv not None, TensorDesc dx not None, int algo):
    """cudnnGetConvolutionBackwardDataWorkspaceSize."""
    if _api.ws_bwd_data == NULL:
        _absent("cudnnGetConvolutionBackwardDataWorkspaceSize")
    cdef cudnnHandle_t h = handle._live()
    cdef cudnnFilterDescriptor_t wd = w._live()
    cdef cudnnTensorDescriptor_t dyd = dy._live(), dxd = dx._live()
    cdef cudnnConvolutionDescriptor_t cd = conv._live()
    cdef size_t size = 0
    cdef cudnnStatus_t status
    with nogil:
        status = _api.ws_bwd_data(h, wd, dyd, cd, dxd, algo, &size)
    _check(status, "cudnnGetConvolutionBackwardDataWorkspaceSize")
    return int(size)


def backward_filter_workspace_size(Handle handle not None, TensorDesc x not None, TensorDesc dy not None,
                                   ConvDesc conv not None, FilterDesc dw not None, int algo):
    """cudnnGetConvolutionBackwardFilterWorkspaceSize."""
    if _api.ws_bwd_filter == NULL:
        _absent("cudnnGetConvolutionBackwardFilterWorkspaceSize")
    cdef cudnnHandle_t h = handle._live()
    cdef cudnnTensorDescriptor_t xd = x._live(), dyd = dy._live()
    cdef cudnnFilterDescriptor_t dwd = dw._live()
    cdef cudnnConvolutionDescriptor_t cd = conv._live()
    cdef size_t size = 0
    cdef cudnnStatus_t status
    with nogil:
        status = _api.ws_bwd_filter(h, xd, dyd, cd, dwd, algo, &size)
    _check(status, "cudnnGetConvolutionBackwardFilterWorkspaceSize")
    return int(size)


def convolution_forward(Handle handle not None, TensorDesc x not None, x_ptr, FilterDesc w not None, w_ptr,
                        ConvDesc conv not None, int algo, TensorDesc y not None, y_ptr, workspace_ptr=0,
                        workspace_bytes=0, float alpha=1.0, float beta=0.0):
    """y = alpha * conv(x, w) + beta * y (cudnnConvolutionForward), queued on the handle's
    stream. alpha and beta are passed as host floats (right for float32, float16 and
    bfloat16 data)."""
    if _api.conv_fwd == NULL:
        _absent("cudnnConvolutionForward")
    cdef cudnnHandle_t h = handle._live()
    cdef cudnnTensorDescriptor_t xd = x._live(), yd = y._live()
    cdef cudnnFilterDescriptor_t wd = w._live()
    cdef cudnnConvolutionDescriptor_t cd = conv._live()
    cdef const void* xp = _dev(x_ptr, "x")
    cdef const void* wp = _dev(w_ptr, "w")
    cdef void* yp = _dev(y_ptr, "y")
    cdef void* ws = <void*><uintptr_t>int(workspace_ptr)
    cdef size_t wsb = int(workspace_bytes)
    cdef cudnnStatus_t status
    with nogil:
        status = _api.conv_fwd(h, &alpha, xd, xp, wd, wp, cd, algo, ws, wsb, &beta, yd, yp)
    _check(status, "cudnnConvolutionForward")


def convolution_backward_data(Handle handle not None, FilterDesc w not None, w_ptr, TensorDesc dy not None,
                              dy_ptr, ConvDesc conv not None, int algo, TensorDesc dx not None, dx_ptr,
                              workspace_ptr=0, workspace_bytes=0, float alpha=1.0, float beta=0.0):
    """dx = alpha * conv_transpose(dy, w) + beta * dx (cudnnConvolutionBackwardData)."""
    if _api.conv_bwd_data == NULL:
        _absent("cudnnConvolutionBackwardData")
    cdef cudnnHandle_t h = handle._live()
    cdef cudnnFilterDescriptor_t wd = w._live()
    cdef cudnnTensorDescriptor_t dyd = dy._live(), dxd = dx._live()
    cdef cudnnConvolutionDescriptor_t cd = conv._live()
    cdef const void* wp = _dev(w_ptr, "w")
    cdef const void* dyp = _dev(dy_ptr, "dy")
    cdef void* dxp = _dev(dx_ptr, "dx")
    cdef void* ws = <void*><uintptr_t>int(workspace_ptr)
    cdef size_t wsb = int(workspace_bytes)
    cdef cudnnStatus_t status
    with nogil:
        status = _api.conv_bwd_data(h, &alpha, wd, wp, dyd, dyp, cd, algo, ws, wsb, &beta, dxd, dxp)
    _check(status, "cudnnConvolutionBackwardData")


def convolution_backward_filter(Handle handle not None, TensorDesc x not None, x_ptr, TensorDesc dy not None,
                                dy_ptr, ConvDesc conv not None, int algo, FilterDesc dw not None, dw_ptr,
                                workspace_ptr=0, workspace_bytes=0, float alpha=1.0, float beta=0.0):
    """dw = alpha * (the filter gradient of x and dy) + beta * dw (cudnnConvolutionBackwardFilter);
    beta=1 accumulates into dw."""
    if _api.conv_bwd_filter == NULL:
        _absent("cudnnConvolutionBackwardFilter")
    cdef cudnnHandle_t h = handle._live()
    cdef cudnnTensorDescriptor_t xd = x._live(), dyd = dy._live()
    cdef cudnnFilterDescriptor_t dwd = dw._live()
    cdef cudnnConvolutionDescriptor_t cd = conv._live()
    cdef const void* xp = _dev(x_ptr, "x")
    cdef const void* dyp = _dev(dy_ptr, "dy")
    cdef void* dwp = _dev(dw_ptr, "dw")
    cdef void* ws = <void*><uintptr_t>int(workspace_ptr)
    cdef size_t wsb = int(workspace_bytes)
    cdef cudnnStatus_t status
    with nogil:
        status = _api.conv_bwd_filter(h, &alpha, xd, xp, dyd, dyp, cd, algo, ws, wsb, &beta, dwd, dwp)
    _check(status, "cudnnConvolutionBackwardFilter")
