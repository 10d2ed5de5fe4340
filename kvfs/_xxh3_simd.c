/* XXH3-64 compiled by kvfs for the CPU's widest vector unit.
 *
 * python-xxhash (and so kvfs.chunkio before) hashes with its SSE2 build of XXH3; AVX2 hashes about
 * twice as fast, and every verified read spends much of its CPU there. _xxh3_avx2.c and _xxh3_avx512.c
 * each compile xxhash.h (libxxhash-dev, not vendored) for one instruction set; this file, compiled for
 * baseline x86-64 so that importing it is safe on any CPU, lists those the CPU supports:
 *
 *     impls() -> [(name, address), ...], widest first
 *     streams() -> [(name, (create, free, reset, update, digest)), ...]: the same builds' streaming
 *                  XXH3-64 (addresses), for kvfs._blockhash.init_stream
 *
 * kvfs.xxh3_impls checks each against python-xxhash before handing its address to
 * kvfs._blockhash.init(). Optional extension: no compiler or no xxhash.h -> not built, and kvfs
 * hashes with python-xxhash's function as before.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "_xxh3_simd.h"

#define N_ISAS 2 /* widest first */
static const char *const ISA_NAMES[N_ISAS] = {"avx512", "avx2"};
static void *const ISA_HASH[N_ISAS] = {(void *)kvfs_xxh3_avx512, (void *)kvfs_xxh3_avx2};
static void *const ISA_STREAM[N_ISAS][5] = {
    {(void *)kvfs_xxh3_avx512_create, (void *)kvfs_xxh3_avx512_free, (void *)kvfs_xxh3_avx512_reset,
     (void *)kvfs_xxh3_avx512_update, (void *)kvfs_xxh3_avx512_digest},
    {(void *)kvfs_xxh3_avx2_create, (void *)kvfs_xxh3_avx2_free, (void *)kvfs_xxh3_avx2_reset,
     (void *)kvfs_xxh3_avx2_update, (void *)kvfs_xxh3_avx2_digest},
};

static int isa_supported(size_t i) {
    __builtin_cpu_init();
    return i == 0 ? __builtin_cpu_supports("avx512f") : __builtin_cpu_supports("avx2");
}

/* [(name, value(i))] for each build this CPU supports, widest first. */
static PyObject *listing(PyObject *(*value)(size_t)) {
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < N_ISAS; i++) {
        if (!isa_supported(i))
            continue;
        PyObject *v = value(i);
        PyObject *item = v == NULL ? NULL : Py_BuildValue("(sN)", ISA_NAMES[i], v);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

static PyObject *hash_address(size_t i) { return PyLong_FromVoidPtr(ISA_HASH[i]); }

static PyObject *stream_addresses(size_t i) {
    void *const *f = ISA_STREAM[i];
    return Py_BuildValue("(NNNNN)", PyLong_FromVoidPtr(f[0]), PyLong_FromVoidPtr(f[1]), PyLong_FromVoidPtr(f[2]),
                         PyLong_FromVoidPtr(f[3]), PyLong_FromVoidPtr(f[4]));
}

static PyObject *impls(PyObject *self, PyObject *unused) { return listing(hash_address); }

static PyObject *streams(PyObject *self, PyObject *unused) { return listing(stream_addresses); }

static PyMethodDef methods[] = {
    {"impls", impls, METH_NOARGS, "[(name, address of an XXH3_64bits)] this CPU supports, widest first."},
    {"streams", streams, METH_NOARGS,
     "[(name, (create, free, reset, update, digest) addresses)] of the streaming XXH3-64 builds this CPU supports."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_xxh3_simd", NULL, -1, methods};

PyMODINIT_FUNC PyInit__xxh3_simd(void) { return PyModule_Create(&module); }
