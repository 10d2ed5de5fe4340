/* XXH3-64 with AVX-512 (AVX512F only), like _xxh3_avx2.c: this file alone is compiled for it and the
 * function is offered only where __builtin_cpu_supports("avx512f"). */
#if !defined(__GNUC__) || defined(__clang__) || !defined(__x86_64__)
#error "built with GCC on x86-64 only (optional: kvfs falls back to python-xxhash's XXH3)"
#endif
#pragma GCC target("avx512f")
#define XXH_INLINE_ALL
#define XXH_VECTOR XXH_AVX512
#include <xxhash.h>
#include "_xxh3_simd.h"

uint64_t kvfs_xxh3_avx512(const void *data, size_t len) { return XXH3_64bits(data, len); }
KVFS_XXH3_STREAM_DEF(avx512)
