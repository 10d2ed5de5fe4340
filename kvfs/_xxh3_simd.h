/* The XXH3-64 builds kvfs._xxh3_simd carries, one per x86 vector instruction set. */
#ifndef KVFS_XXH3_SIMD_H
#define KVFS_XXH3_SIMD_H
#include <stddef.h>
#include <stdint.h>

uint64_t kvfs_xxh3_avx2(const void *data, size_t len);
uint64_t kvfs_xxh3_avx512(const void *data, size_t len);

/* Streaming XXH3-64 of the same builds (kvfs._blockhash.read_hashed hashes a block as it is read):
 * create, free, reset, update, digest, as XXH3_createState ... XXH3_64bits_digest. */
#define KVFS_XXH3_STREAM_DECL(isa)                                           \
    void *kvfs_xxh3_##isa##_create(void);                                    \
    int kvfs_xxh3_##isa##_free(void *state);                                 \
    int kvfs_xxh3_##isa##_reset(void *state);                                \
    int kvfs_xxh3_##isa##_update(void *state, const void *data, size_t len); \
    uint64_t kvfs_xxh3_##isa##_digest(const void *state);
KVFS_XXH3_STREAM_DECL(avx2)
KVFS_XXH3_STREAM_DECL(avx512)

#define KVFS_XXH3_STREAM_DEF(isa)                                                                            \
    void *kvfs_xxh3_##isa##_create(void) { return XXH3_createState(); }                                      \
    int kvfs_xxh3_##isa##_free(void *state) { return XXH3_freeState(state); }                                \
    int kvfs_xxh3_##isa##_reset(void *state) { return XXH3_64bits_reset(state); }                            \
    int kvfs_xxh3_##isa##_update(void *state, const void *data, size_t len) {                                \
        return XXH3_64bits_update(state, data, len);                                                         \
    }                                                                                                        \
    uint64_t kvfs_xxh3_##isa##_digest(const void *state) { return XXH3_64bits_digest(state); }
#endif
