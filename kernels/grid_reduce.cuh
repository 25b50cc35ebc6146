// One launch for a reduction whose partials come from many blocks: the last block of each
// grid column to finish merges that column's partials (the threadFenceReduction pattern of
// the CUDA samples), instead of a second kernel launched after the first.
#ifndef GRID_REDUCE_CUH
#define GRID_REDUCE_CUH

/* True, in every thread of the block, in the last block of its grid column (blockIdx.x) to
 * get here; by then every block of the column has written its partials. Each thread fences
 * its own writes before the count, so they are visible to the last block, which reads them
 * through L2 (rm_load_partial). `arrivals` holds one counter per grid column, zero before
 * the launch; the last block sets its counter back to zero, so the next launch, or the next
 * replay of a captured graph, finds zeros again. Call it from every thread of the block. */
__device__ __forceinline__ bool rm_last_block_of_column(unsigned int* arrivals)
{
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        last = atomicAdd(&arrivals[blockIdx.x], 1u) == gridDim.y - 1;
        if (last)
            arrivals[blockIdx.x] = 0u;
    }
    __syncthreads();
    return last;
}

/* A partial another block wrote in this launch: loaded from L2, never from a stale L1 line. */
__device__ __forceinline__ float rm_load_partial(const float* p, long long i)
{
    return __ldcg(p + i);
}

#endif
