/* CUDA C++ as host C++: enough of the language for the .cu files of kernels to compile unchanged
 * with g++ and run on the CPU (engine/kernel_emulation.py force-includes this header).
 *
 * Execution model: the blocks of a grid run one after another; the threads of one block run
 * at the same time as one OpenMP team of blockDim threads, so `__shared__` (a static) is
 * one array per block, common to the block's threads, and __syncthreads() is a real barrier
 * of those threads. A barrier that not every thread of the block reaches (a thread returned,
 * or waits elsewhere past EMU_BARRIER_TIMEOUT_S seconds) aborts the process with a message
 * naming the kernel and block, as a hung or faulting launch would stop a GPU job; so does a
 * vector access the GPU would refuse as misaligned (-fsanitize=alignment).
 * Not modelled: warps and their lockstep, the memory model, caches, speed.
 */
#ifndef CUDA_HOST_SHIM_H
#define CUDA_HOST_SHIM_H

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <chrono>
#include <condition_variable>
#include <mutex>

/* recipe_math.cuh then takes its CUDA branch (templates, qualifiers) with its host math:
 * __CUDA_ARCH__ stays undefined, as in nvcc's host pass. */
#define __CUDACC__ 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

/* ---- vector types, with the alignment the GPU requires of their accesses ---------------- */
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(4) uchar4 { unsigned char x, y, z, w; };
struct uint3 { unsigned int x, y, z; };

inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }

/* ---- grid-wide ordering: blocks run in turn, so one block's writes are seen by the next;
 * the fence and the cache-global load have nothing more to do, the atomic is a real one. */
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float __ldcg(const float* p) { return *p; }

/* ---- launch geometry ------------------------------------------------------------------ */
/* Blocks run in turn, so the grid and block shapes and the block index are one value for
 * every thread; the thread index is each OpenMP thread's own. */
static uint3 gridDim, blockDim, blockIdx;
static thread_local uint3 threadIdx;

/* ---- the block barrier ---------------------------------------------------------------- */
struct emu_block {
    std::mutex lock;
    std::condition_variable turn;
    unsigned int size = 0;      /* threads in the block */
    unsigned int waiting = 0;   /* threads at the current barrier */
    unsigned int exited = 0;    /* threads that returned from the kernel */
    unsigned long generation = 0;
    const char *kernel = "";
};
static emu_block emu_current;

static double emu_barrier_timeout_s()
{
    const char *s = getenv("EMU_BARRIER_TIMEOUT_S");
    return s ? atof(s) : 20.0;
}

/* Every fault ends in abort(): SIGABRT, on which pytest's faulthandler prints the Python stack
 * (the test, the launcher) to the terminal; what is printed here and the sanitizer's report go
 * to stderr, which pytest captures (-s shows them). */
[[noreturn]] static void emu_divergent(const char *why)
{
    fprintf(stderr, "kernel emulation: %s: divergent __syncthreads in block (%u,%u,%u) of %u threads: %s\n",
            emu_current.kernel, blockIdx.x, blockIdx.y, blockIdx.z, emu_current.size, why);
    fflush(stderr);
    abort();
}

/* -fsanitize=alignment: after its report the sanitizer would exit(1), which pytest's
 * faulthandler does not see; this makes it an abort naming the launch. The sanitizer keeps
 * one callback per process and each kernel file is its own library, so every launch sets it. */
extern "C" void __sanitizer_set_death_callback(void (*callback)(void));

static void emu_sanitizer_fault()
{
    fprintf(stderr, "kernel emulation: %s: misaligned access in block (%u,%u,%u) (report above)\n",
            emu_current.kernel, blockIdx.x, blockIdx.y, blockIdx.z);
    fflush(stderr);
    abort();
}

/* Whichever comes first, the return or the other threads' barrier, it is the same fault. */
#define EMU_RETURNED "a thread returned from the kernel before a barrier the others reach"

inline void __syncthreads()
{
    emu_block &b = emu_current;
    std::unique_lock<std::mutex> hold(b.lock);
    if (b.exited)
        emu_divergent(EMU_RETURNED);
    const unsigned long gen = b.generation;
    if (++b.waiting == b.size) {
        b.waiting = 0;
        ++b.generation;
        b.turn.notify_all();
        return;
    }
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration<double>(emu_barrier_timeout_s());
    while (b.generation == gen)
        if (b.turn.wait_until(hold, deadline) == std::cv_status::timeout && b.generation == gen) {
            char why[128];
            snprintf(why, sizeof why, "%u threads still wait at a barrier after %g s", b.waiting,
                     emu_barrier_timeout_s());
            emu_divergent(why);
        }
}

static void emu_thread_returned()
{
    emu_block &b = emu_current;
    std::lock_guard<std::mutex> hold(b.lock);
    if (b.waiting)
        emu_divergent(EMU_RETURNED);
    ++b.exited;
}

/* Run `body` (one kernel call) for every thread of every block of the launch. */
template <typename Body>
static void emu_launch(const char *kernel, const unsigned int *grid, const unsigned int *block, Body body)
{
    __sanitizer_set_death_callback(emu_sanitizer_fault);
    gridDim = uint3{grid[0], grid[1], grid[2]};
    blockDim = uint3{block[0], block[1], block[2]};
    const unsigned int size = block[0] * block[1] * block[2];
    for (unsigned int z = 0; z < grid[2]; ++z)
        for (unsigned int y = 0; y < grid[1]; ++y)
            for (unsigned int x = 0; x < grid[0]; ++x) {
                blockIdx = uint3{x, y, z};
                emu_current.size = size;
                emu_current.waiting = emu_current.exited = 0;
                emu_current.kernel = kernel;
#pragma omp parallel num_threads(size)
                {
                    if ((unsigned int)omp_get_num_threads() != size) {
                        fprintf(stderr, "kernel emulation: %s: OpenMP gave %d threads for a block of %u\n",
                                kernel, omp_get_num_threads(), size);
                        abort();
                    }
                    const unsigned int t = (unsigned int)omp_get_thread_num();
                    threadIdx = uint3{t % block[0], t / block[0] % block[1], t / (block[0] * block[1])};
                    body();
                    emu_thread_returned();
                }
            }
}

/* The same for a kernel that never synchronizes its block's threads nor shares memory
 * between them (engine.kernel_emulation decides from the source): each thread runs to its end
 * in turn, in the calling OS thread. A team of OpenMP threads per block would give the same
 * result, at the cost of thousands of thread wake-ups per launch on a two-core machine. */
template <typename Body>
static void emu_launch_serial(const char *kernel, const unsigned int *grid, const unsigned int *block, Body body)
{
    __sanitizer_set_death_callback(emu_sanitizer_fault);
    gridDim = uint3{grid[0], grid[1], grid[2]};
    blockDim = uint3{block[0], block[1], block[2]};
    emu_current.kernel = kernel;
    for (unsigned int z = 0; z < grid[2]; ++z)
        for (unsigned int y = 0; y < grid[1]; ++y)
            for (unsigned int x = 0; x < grid[0]; ++x) {
                blockIdx = uint3{x, y, z};
                for (unsigned int tz = 0; tz < block[2]; ++tz)
                    for (unsigned int ty = 0; ty < block[1]; ++ty)
                        for (unsigned int tx = 0; tx < block[0]; ++tx) {
                            threadIdx = uint3{tx, ty, tz};
                            body();
                        }
            }
}

#endif /* CUDA_HOST_SHIM_H */
