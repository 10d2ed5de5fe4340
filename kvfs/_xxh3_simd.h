/* The XXH3-64 builds kvfs._xxh3_simd carries, one per x86 vector instruction set. */
#ifndef KVFS_XXH3_SIMD_H
#define KVFS_XXH3_SIMD_H
#include <stddef.h>
#include <stdint.h>

uint64_t kvfs_xxh3_avx2(const void *data, size_t len);
uint64_t kvfs_xxh3_avx512(const void *data, size_t len);
#endif
