/* The part of NCCL's C API that engine.nccl uses, declared by us.
 *
 * The binding must build on machines with neither CUDA nor NCCL installed, so it never
 * includes nccl.h or cuda_runtime.h: the types are opaque or plain integers here, and the
 * library is opened at run time (dlopen) and its functions looked up by name (dlsym) into
 * pointers of the types below. The values are NCCL's stable ABI (unchanged since 2.x).
 */
#ifndef ENGINE_NCCL_DECLS_H
#define ENGINE_NCCL_DECLS_H

#include <stddef.h>

#define ENGINE_NCCL_UNIQUE_ID_BYTES 128

typedef struct engine_ncclComm *ncclComm_t;       /* opaque: only ever passed back */
typedef void *cudaStream_t;                       /* opaque: 0 is the legacy default stream */
typedef struct { char internal[ENGINE_NCCL_UNIQUE_ID_BYTES]; } ncclUniqueId;
typedef int ncclResult_t;                         /* ncclSuccess == 0 */
typedef int ncclDataType_t;
typedef int ncclRedOp_t;

/* ncclResult_t */
#define ENGINE_NCCL_SUCCESS 0
#define ENGINE_NCCL_IN_PROGRESS 7

/* ncclDataType_t */
#define ENGINE_NCCL_FLOAT16 6
#define ENGINE_NCCL_FLOAT32 7
#define ENGINE_NCCL_BFLOAT16 9

/* ncclRedOp_t */
#define ENGINE_NCCL_SUM 0
#define ENGINE_NCCL_AVG 4

typedef ncclResult_t (*ncclGetVersion_t)(int *version);
typedef ncclResult_t (*ncclGetUniqueId_t)(ncclUniqueId *uid);
typedef ncclResult_t (*ncclCommInitRank_t)(ncclComm_t *comm, int nranks, ncclUniqueId uid, int rank);
typedef ncclResult_t (*ncclCommDestroy_t)(ncclComm_t comm);
typedef ncclResult_t (*ncclCommAbort_t)(ncclComm_t comm);
typedef ncclResult_t (*ncclCommGetAsyncError_t)(ncclComm_t comm, ncclResult_t *async_error);
typedef ncclResult_t (*ncclCommCount_t)(ncclComm_t comm, int *count);
typedef ncclResult_t (*ncclCommUserRank_t)(ncclComm_t comm, int *rank);
typedef ncclResult_t (*ncclAllReduce_t)(const void *sendbuff, void *recvbuff, size_t count,
                                        ncclDataType_t datatype, ncclRedOp_t op,
                                        ncclComm_t comm, cudaStream_t stream);
typedef ncclResult_t (*ncclBroadcast_t)(const void *sendbuff, void *recvbuff, size_t count,
                                        ncclDataType_t datatype, int root,
                                        ncclComm_t comm, cudaStream_t stream);
typedef ncclResult_t (*ncclGroupStart_t)(void);
typedef ncclResult_t (*ncclGroupEnd_t)(void);
typedef const char *(*ncclGetErrorString_t)(ncclResult_t result);
typedef const char *(*ncclGetLastError_t)(ncclComm_t comm);   /* NCCL >= 2.13 */

#endif
