/* The part of cuDNN 9's C API that engine.cudnn uses, declared by us.
 *
 * The binding must build on machines with neither CUDA nor cuDNN installed, so it never
 * includes cudnn.h or cuda_runtime.h: handles and descriptors are opaque pointers, enums are
 * plain ints (every cuDNN enum is int-sized), and the library is opened at run time (dlopen)
 * and its functions looked up by name (dlsym) into pointers of the types below.
 *
 * Every value below was copied from the headers that the nvidia-cudnn-cu12 9.28.0.42 wheel
 * ships (nvidia/cudnn/include/, CUDNN_VERSION 92800); the header and enum are named at each
 * group. All of them are marked "@since cuDNN 9.0.0" there, so they hold for every 9.x.
 * The legacy convolution API (cudnn_cnn.h) is deprecated in 9.x in favour of the graph API
 * but present in every 9.x release, in libcudnn.so.9 itself (it forwards to the sub-libraries
 * libcudnn_ops/cnn/graph.so.9, which it dlopens from its own directory).
 */
#ifndef ENGINE_CUDNN_DECLS_H
#define ENGINE_CUDNN_DECLS_H

#include <stddef.h>

typedef struct engine_cudnnContext *cudnnHandle_t;                     /* cudnn_graph.h */
typedef struct engine_cudnnTensorStruct *cudnnTensorDescriptor_t;      /* cudnn_ops.h */
typedef struct engine_cudnnFilterStruct *cudnnFilterDescriptor_t;      /* cudnn_ops.h */
typedef struct engine_cudnnConvolutionStruct *cudnnConvolutionDescriptor_t; /* cudnn_cnn.h */
typedef void *cudaStream_t;                      /* opaque: 0 is the legacy default stream */

typedef int cudnnStatus_t;
typedef int cudnnDataType_t;
typedef int cudnnTensorFormat_t;
typedef int cudnnMathType_t;
typedef int cudnnConvolutionMode_t;
typedef int cudnnDeterminism_t;
typedef int cudnnConvolutionFwdAlgo_t;
typedef int cudnnConvolutionBwdDataAlgo_t;
typedef int cudnnConvolutionBwdFilterAlgo_t;

/* cudnnStatus_t, cudnn_graph.h (the full list of names is in csrc/cudnn.pyx, _STATUS_NAMES) */
#define ENGINE_CUDNN_STATUS_SUCCESS 0
#define ENGINE_CUDNN_STATUS_BAD_PARAM 2000

/* cudnnDataType_t, cudnn_graph.h */
#define ENGINE_CUDNN_DATA_FLOAT 0
#define ENGINE_CUDNN_DATA_DOUBLE 1
#define ENGINE_CUDNN_DATA_HALF 2
#define ENGINE_CUDNN_DATA_BFLOAT16 9

/* cudnnTensorFormat_t, cudnn_graph.h. For a filter, NCHW is KCRS = (Cout, Cin, KH, KW) and
 * NHWC is KRSC = (Cout, KH, KW, Cin). */
#define ENGINE_CUDNN_TENSOR_NCHW 0
#define ENGINE_CUDNN_TENSOR_NHWC 1

/* cudnnMathType_t, cudnn_graph.h */
#define ENGINE_CUDNN_DEFAULT_MATH 0
#define ENGINE_CUDNN_TENSOR_OP_MATH 1
#define ENGINE_CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION 2
#define ENGINE_CUDNN_FMA_MATH 3

/* cudnnConvolutionMode_t, cudnn_graph.h */
#define ENGINE_CUDNN_CONVOLUTION 0
#define ENGINE_CUDNN_CROSS_CORRELATION 1

/* cudnnDeterminism_t, cudnn_ops.h: CUDNN_NON_DETERMINISTIC 0, CUDNN_DETERMINISTIC 1.
 * cudnnConvolutionFwdAlgo_t, cudnnConvolutionBwdFilterAlgo_t, cudnnConvolutionBwdDataAlgo_t,
 * cudnn_ops.h: their names, by value, are in csrc/cudnn.pyx (_FWD_ALGOS, ...). */
#define ENGINE_CUDNN_CONVOLUTION_FWD_ALGO_COUNT 8
#define ENGINE_CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT 7
#define ENGINE_CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT 6

/* cudnnConvolutionFwdAlgoPerf_t, cudnnConvolutionBwdDataAlgoPerf_t and
 * cudnnConvolutionBwdFilterAlgoPerf_t, cudnn_cnn.h: the three have this one layout
 * (algo, status, time in ms, workspace bytes, determinism, math type, int reserved[3]). */
typedef struct {
    int algo;
    cudnnStatus_t status;
    float time;
    size_t memory;
    cudnnDeterminism_t determinism;
    cudnnMathType_t mathType;
    int reserved[3];
} engine_cudnnAlgoPerf_t;

/* cudnn_graph.h */
typedef size_t (*cudnnGetVersion_t)(void);
typedef size_t (*cudnnGetCudartVersion_t)(void);
typedef const char *(*cudnnGetErrorString_t)(cudnnStatus_t status);
typedef void (*cudnnGetLastErrorString_t)(char *message, size_t max_size);   /* 9.0+ */
typedef cudnnStatus_t (*cudnnCreate_t)(cudnnHandle_t *handle);
typedef cudnnStatus_t (*cudnnDestroy_t)(cudnnHandle_t handle);
typedef cudnnStatus_t (*cudnnSetStream_t)(cudnnHandle_t handle, cudaStream_t stream);
typedef cudnnStatus_t (*cudnnGetStream_t)(cudnnHandle_t handle, cudaStream_t *stream);

/* cudnn_ops.h */
typedef cudnnStatus_t (*cudnnCreateTensorDescriptor_t)(cudnnTensorDescriptor_t *desc);
typedef cudnnStatus_t (*cudnnDestroyTensorDescriptor_t)(cudnnTensorDescriptor_t desc);
typedef cudnnStatus_t (*cudnnSetTensor4dDescriptor_t)(cudnnTensorDescriptor_t desc, cudnnTensorFormat_t format,
                                                      cudnnDataType_t dtype, int n, int c, int h, int w);
typedef cudnnStatus_t (*cudnnGetTensor4dDescriptor_t)(cudnnTensorDescriptor_t desc, cudnnDataType_t *dtype,
                                                      int *n, int *c, int *h, int *w,
                                                      int *nStride, int *cStride, int *hStride, int *wStride);
typedef cudnnStatus_t (*cudnnCreateFilterDescriptor_t)(cudnnFilterDescriptor_t *desc);
typedef cudnnStatus_t (*cudnnDestroyFilterDescriptor_t)(cudnnFilterDescriptor_t desc);
typedef cudnnStatus_t (*cudnnSetFilter4dDescriptor_t)(cudnnFilterDescriptor_t desc, cudnnDataType_t dtype,
                                                      cudnnTensorFormat_t format, int k, int c, int h, int w);
typedef cudnnStatus_t (*cudnnGetFilter4dDescriptor_t)(cudnnFilterDescriptor_t desc, cudnnDataType_t *dtype,
                                                      cudnnTensorFormat_t *format, int *k, int *c, int *h, int *w);

/* cudnn_cnn.h */
typedef cudnnStatus_t (*cudnnCreateConvolutionDescriptor_t)(cudnnConvolutionDescriptor_t *desc);
typedef cudnnStatus_t (*cudnnDestroyConvolutionDescriptor_t)(cudnnConvolutionDescriptor_t desc);
typedef cudnnStatus_t (*cudnnSetConvolution2dDescriptor_t)(cudnnConvolutionDescriptor_t desc,
                                                           int pad_h, int pad_w, int u, int v,
                                                           int dilation_h, int dilation_w,
                                                           cudnnConvolutionMode_t mode, cudnnDataType_t compute);
typedef cudnnStatus_t (*cudnnGetConvolution2dDescriptor_t)(cudnnConvolutionDescriptor_t desc,
                                                           int *pad_h, int *pad_w, int *u, int *v,
                                                           int *dilation_h, int *dilation_w,
                                                           cudnnConvolutionMode_t *mode, cudnnDataType_t *compute);
typedef cudnnStatus_t (*cudnnSetConvolutionMathType_t)(cudnnConvolutionDescriptor_t desc, cudnnMathType_t math);
typedef cudnnStatus_t (*cudnnGetConvolutionMathType_t)(cudnnConvolutionDescriptor_t desc, cudnnMathType_t *math);
typedef cudnnStatus_t (*cudnnGetConvolution2dForwardOutputDim_t)(cudnnConvolutionDescriptor_t conv,
                                                                 cudnnTensorDescriptor_t x, cudnnFilterDescriptor_t w,
                                                                 int *n, int *c, int *h, int *w_out);

/* Algorithm search: ...AlgorithmEx times every algorithm on the given buffers (needs a GPU);
 * ..._v7 asks the heuristics (needs a handle, so a GPU too). perf is an array of `requested`. */
typedef cudnnStatus_t (*cudnnFindConvolutionForwardAlgorithmEx_t)(
    cudnnHandle_t handle, cudnnTensorDescriptor_t xDesc, const void *x, cudnnFilterDescriptor_t wDesc,
    const void *w, cudnnConvolutionDescriptor_t convDesc, cudnnTensorDescriptor_t yDesc, void *y,
    int requested, int *returned, engine_cudnnAlgoPerf_t *perf, void *workspace, size_t workspace_bytes);
typedef cudnnStatus_t (*cudnnFindConvolutionBackwardDataAlgorithmEx_t)(
    cudnnHandle_t handle, cudnnFilterDescriptor_t wDesc, const void *w, cudnnTensorDescriptor_t dyDesc,
    const void *dy, cudnnConvolutionDescriptor_t convDesc, cudnnTensorDescriptor_t dxDesc, void *dx,
    int requested, int *returned, engine_cudnnAlgoPerf_t *perf, void *workspace, size_t workspace_bytes);
typedef cudnnStatus_t (*cudnnFindConvolutionBackwardFilterAlgorithmEx_t)(
    cudnnHandle_t handle, cudnnTensorDescriptor_t xDesc, const void *x, cudnnTensorDescriptor_t dyDesc,
    const void *dy, cudnnConvolutionDescriptor_t convDesc, cudnnFilterDescriptor_t dwDesc, void *dw,
    int requested, int *returned, engine_cudnnAlgoPerf_t *perf, void *workspace, size_t workspace_bytes);
typedef cudnnStatus_t (*cudnnGetConvolutionForwardAlgorithm_v7_t)(
    cudnnHandle_t handle, cudnnTensorDescriptor_t xDesc, cudnnFilterDescriptor_t wDesc,
    cudnnConvolutionDescriptor_t convDesc, cudnnTensorDescriptor_t yDesc,
    int requested, int *returned, engine_cudnnAlgoPerf_t *perf);
typedef cudnnStatus_t (*cudnnGetConvolutionBackwardDataAlgorithm_v7_t)(
    cudnnHandle_t handle, cudnnFilterDescriptor_t wDesc, cudnnTensorDescriptor_t dyDesc,
    cudnnConvolutionDescriptor_t convDesc, cudnnTensorDescriptor_t dxDesc,
    int requested, int *returned, engine_cudnnAlgoPerf_t *perf);
typedef cudnnStatus_t (*cudnnGetConvolutionBackwardFilterAlgorithm_v7_t)(
    cudnnHandle_t handle, cudnnTensorDescriptor_t xDesc, cudnnTensorDescriptor_t dyDesc,
    cudnnConvolutionDescriptor_t convDesc, cudnnFilterDescriptor_t dwDesc,
    int requested, int *returned, engine_cudnnAlgoPerf_t *perf);

typedef cudnnStatus_t (*cudnnGetConvolutionForwardWorkspaceSize_t)(
    cudnnHandle_t handle, cudnnTensorDescriptor_t xDesc, cudnnFilterDescriptor_t wDesc,
    cudnnConvolutionDescriptor_t convDesc, cudnnTensorDescriptor_t yDesc, cudnnConvolutionFwdAlgo_t algo,
    size_t *bytes);
typedef cudnnStatus_t (*cudnnGetConvolutionBackwardDataWorkspaceSize_t)(
    cudnnHandle_t handle, cudnnFilterDescriptor_t wDesc, cudnnTensorDescriptor_t dyDesc,
    cudnnConvolutionDescriptor_t convDesc, cudnnTensorDescriptor_t dxDesc, cudnnConvolutionBwdDataAlgo_t algo,
    size_t *bytes);
typedef cudnnStatus_t (*cudnnGetConvolutionBackwardFilterWorkspaceSize_t)(
    cudnnHandle_t handle, cudnnTensorDescriptor_t xDesc, cudnnTensorDescriptor_t dyDesc,
    cudnnConvolutionDescriptor_t convDesc, cudnnFilterDescriptor_t dwDesc, cudnnConvolutionBwdFilterAlgo_t algo,
    size_t *bytes);

/* y = alpha * conv(x, w) + beta * y, and the two gradients; alpha and beta point to host
 * floats for float, half and bfloat16 data (to doubles only for double data). */
typedef cudnnStatus_t (*cudnnConvolutionForward_t)(
    cudnnHandle_t handle, const void *alpha, cudnnTensorDescriptor_t xDesc, const void *x,
    cudnnFilterDescriptor_t wDesc, const void *w, cudnnConvolutionDescriptor_t convDesc,
    cudnnConvolutionFwdAlgo_t algo, void *workspace, size_t workspace_bytes, const void *beta,
    cudnnTensorDescriptor_t yDesc, void *y);
typedef cudnnStatus_t (*cudnnConvolutionBackwardData_t)(
    cudnnHandle_t handle, const void *alpha, cudnnFilterDescriptor_t wDesc, const void *w,
    cudnnTensorDescriptor_t dyDesc, const void *dy, cudnnConvolutionDescriptor_t convDesc,
    cudnnConvolutionBwdDataAlgo_t algo, void *workspace, size_t workspace_bytes, const void *beta,
    cudnnTensorDescriptor_t dxDesc, void *dx);
typedef cudnnStatus_t (*cudnnConvolutionBackwardFilter_t)(
    cudnnHandle_t handle, const void *alpha, cudnnTensorDescriptor_t xDesc, const void *x,
    cudnnTensorDescriptor_t dyDesc, const void *dy, cudnnConvolutionDescriptor_t convDesc,
    cudnnConvolutionBwdFilterAlgo_t algo, void *workspace, size_t workspace_bytes, const void *beta,
    cudnnFilterDescriptor_t dwDesc, void *dw);

#endif
