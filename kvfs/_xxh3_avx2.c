/* XXH3-64 with AVX2 (xxhash.h from libxxhash-dev, inlined). The pragma compiles this file alone for
 * AVX2, as -mavx2 would, while the module's import code stays baseline x86-64: kvfs._xxh3_simd imports
 * on any CPU and offers this function only where __builtin_cpu_supports("avx2"). */
#if !defined(__GNUC__) || defined(__clang__) || !defined(__x86_64__)
#error "built with GCC on x86-64 only (optional: kvfs falls back to python-xxhash's XXH3)"
#endif
#pragma GCC target("avx2")
#define XXH_INLINE_ALL
#define XXH_VECTOR XXH_AVX2
#include <xxhash.h>
#include "_xxh3_simd.h"

uint64_t kvfs_xxh3_avx2(const void *data, size_t len) { return XXH3_64bits(data, len); }
KVFS_XXH3_STREAM_DEF(avx2)
