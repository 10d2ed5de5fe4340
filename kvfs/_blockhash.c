/* Per-block checksums of a buffer in one call, without the GIL.
 *
 * kvfs checksums every 64 KiB block of a chunk with XXH3-64. Hashing block by block from Python
 * costs a Python call and a GIL round trip per block, so a reader's threads verify one block at a
 * time (about 4-8 GB/s on a 16-core host, against 60 GB/s for the reads themselves). These two
 * functions loop over the blocks in C with the GIL released.
 *
 * preadv_verify() goes one step further for short-circuit reads of local chunk files: the read and the
 * check of every block in one call, so a reader thread takes the GIL once per chunk instead of once
 * per system call and per run of blocks (16 threads reading 4 MiB chunks otherwise queue on the GIL).
 *
 * The hash function itself is not compiled here: python-xxhash already carries XXH3_64bits, and
 * kvfs.chunkio hands its address to init() (found with ctypes), so both sides hash with the very same
 * code. Built as an optional extension: without a compiler kvfs falls back to Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

typedef uint64_t (*xxh3_fn)(const void *, size_t);
#define WINDOW (1024 * 1024) /* preadv_verify reads this much, then hashes it while it is in cache */
static xxh3_fn xxh3 = NULL;

static PyObject *init(PyObject *self, PyObject *arg) {
    void *fn = PyLong_AsVoidPtr(arg);
    if (fn == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "null hash function");
        return NULL;
    }
    xxh3 = (xxh3_fn)fn;
    Py_RETURN_NONE;
}

static uint64_t load_le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* first_mismatch(data, block, sums) -> index of the first block whose XXH3 differs from the
 * little-endian u64 at sums[8*i], or -1. Block i covers data[i*block : min((i+1)*block, len)]; a block
 * with no data at all counts as a mismatch. */
static PyObject *first_mismatch(PyObject *self, PyObject *args) {
    Py_buffer data, sums;
    Py_ssize_t block;
    if (xxh3 == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "init() not called");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*ny*", &data, &block, &sums))
        return NULL;
    Py_ssize_t nblocks = sums.len / 8, bad = -1;
    if (block <= 0) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&sums);
        PyErr_SetString(PyExc_ValueError, "block must be positive");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < nblocks; i++) {
        Py_ssize_t off = i * block, len = data.len - off;
        if (len <= 0) { bad = i; break; }
        if (len > block) len = block;
        if (xxh3((const char *)data.buf + off, (size_t)len) != load_le64((const unsigned char *)sums.buf + 8 * i)) {
            bad = i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyBuffer_Release(&sums);
    return PyLong_FromSsize_t(bad);
}

/* hash_blocks(data, block) -> bytes: the little-endian u64 XXH3 of each block (the last may be short). */
static PyObject *hash_blocks(PyObject *self, PyObject *args) {
    Py_buffer data;
    Py_ssize_t block;
    if (xxh3 == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "init() not called");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*n", &data, &block))
        return NULL;
    if (block <= 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "block must be positive");
        return NULL;
    }
    Py_ssize_t nblocks = (data.len + block - 1) / block;
    PyObject *out = PyBytes_FromStringAndSize(NULL, nblocks * 8);
    if (out == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < nblocks; i++) {
        Py_ssize_t off = i * block, len = data.len - off;
        if (len > block) len = block;
        uint64_t h = xxh3((const char *)data.buf + off, (size_t)len);
        for (int b = 0; b < 8; b++)
            dst[8 * i + b] = (unsigned char)(h >> (8 * b));
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return out;
}

/* Hash one block that may straddle buffers: contiguous pieces are hashed in place, a block split
 * across buffers is gathered into ``scratch`` first. Advances (*vi, *vpos). */
static uint64_t hash_span(Py_buffer *views, Py_ssize_t nviews, Py_ssize_t *vi, Py_ssize_t *vpos,
                          Py_ssize_t want, unsigned char *scratch) {
    while (*vi < nviews && *vpos >= views[*vi].len) { (*vi)++; *vpos = 0; }
    if (views[*vi].len - *vpos >= want) {
        uint64_t h = xxh3((const char *)views[*vi].buf + *vpos, (size_t)want);
        *vpos += want;
        return h;
    }
    Py_ssize_t got = 0;
    while (got < want) {
        while (*vpos >= views[*vi].len) { (*vi)++; *vpos = 0; }
        Py_ssize_t take = views[*vi].len - *vpos;
        if (take > want - got) take = want - got;
        memcpy(scratch + got, (const char *)views[*vi].buf + *vpos, (size_t)take);
        got += take;
        *vpos += take;
    }
    return xxh3(scratch, (size_t)want);
}

/* preadv_verify(fd, offset, bufs, sums, block) -> (nread, bad)
 * Fill the writable buffers ``bufs`` in order from file ``offset`` on (until full or end of file),
 * then check each ``block``-sized block of the bytes read (block 0 starts at ``offset``) against the
 * little-endian u64s in ``sums``. ``bad``: the index of the first block that differs or has no
 * checksum, else -1. OSError for a failed read. The GIL is released for the whole call. */
static PyObject *preadv_verify(PyObject *self, PyObject *args) {
    int fd;
    long long offset;
    PyObject *seq;
    Py_buffer sums;
    Py_ssize_t block;
    if (xxh3 == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "init() not called");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "iLOy*n", &fd, &offset, &seq, &sums, &block))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "bufs must be a sequence of writable buffers");
    if (fast == NULL) {
        PyBuffer_Release(&sums);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast), taken = 0;
    Py_buffer *views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    struct iovec *iov = PyMem_Calloc(n ? n : 1, sizeof(struct iovec));
    unsigned char *scratch = block > 0 ? PyMem_Malloc((size_t)block) : NULL;
    PyObject *result = NULL;
    if (views == NULL || iov == NULL || scratch == NULL) {
        if (block <= 0)
            PyErr_SetString(PyExc_ValueError, "block must be positive");
        else
            PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t want = 0;
    for (; taken < n; taken++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, taken), &views[taken], PyBUF_WRITABLE) < 0)
            goto done;
        iov[taken].iov_base = views[taken].buf;
        iov[taken].iov_len = (size_t)views[taken].len;
        want += views[taken].len;
    }
    Py_ssize_t total = 0, bad = -1, hashed = 0, nsums = sums.len / 8;
    Py_ssize_t rvi = 0, rvpos = 0;  /* read cursor: buffer, offset in it */
    Py_ssize_t hvi = 0, hvpos = 0;  /* hash cursor */
    int err = 0, eof = 0;
    Py_BEGIN_ALLOW_THREADS
    /* Read a window, then hash its blocks while they are still in the CPU cache: one pass over memory
     * fewer than reading the whole range and hashing it afterwards (16 threads reading at once are
     * bound by memory bandwidth). */
    while (!err && bad < 0 && total < want && !eof) {
        Py_ssize_t goal = total + WINDOW;
        if (goal > want) goal = want;
        while (total < goal) {
            int cnt = 0;
            Py_ssize_t left = goal - total, tvi = rvi, tvpos = rvpos;
            while (left > 0 && cnt < 1024 && tvi < n) {
                Py_ssize_t avail = views[tvi].len - tvpos;
                if (avail <= 0) { tvi++; tvpos = 0; continue; }
                Py_ssize_t take = avail < left ? avail : left;
                iov[cnt].iov_base = (char *)views[tvi].buf + tvpos;
                iov[cnt].iov_len = (size_t)take;
                cnt++;
                left -= take;
                tvpos += take;
            }
            ssize_t r = preadv(fd, iov, cnt, (off_t)(offset + total));
            if (r < 0) {
                if (errno == EINTR) continue;
                err = errno;
                break;
            }
            if (r == 0) { eof = 1; break; }
            total += r;
            while (r > 0) {  /* advance the read cursor past what arrived */
                Py_ssize_t avail = views[rvi].len - rvpos;
                if (avail <= 0) { rvi++; rvpos = 0; continue; }
                Py_ssize_t take = avail < r ? avail : (Py_ssize_t)r;
                rvpos += take;
                r -= take;
            }
        }
        /* Whole blocks read so far, and the short last one once nothing more will come. */
        int last = eof || total >= want || err;
        while (!err && bad < 0 && hashed < total && (total - hashed >= block || last)) {
            Py_ssize_t i = hashed / block, len = total - hashed;
            if (len > block) len = block;
            if (i >= nsums ||
                hash_span(views, n, &hvi, &hvpos, len, scratch) != load_le64((const unsigned char *)sums.buf + 8 * i))
                bad = i;
            hashed += len;
        }
    }
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = Py_BuildValue("nn", total, bad);
done:
    for (Py_ssize_t i = 0; i < taken; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(iov);
    PyMem_Free(scratch);
    Py_DECREF(fast);
    PyBuffer_Release(&sums);
    return result;
}

static PyMethodDef methods[] = {
    {"init", init, METH_O, "Set the XXH3_64bits function (an address) used by the other functions."},
    {"first_mismatch", first_mismatch, METH_VARARGS, "Index of the first block whose checksum differs, or -1."},
    {"hash_blocks", hash_blocks, METH_VARARGS, "Little-endian u64 XXH3 of every block."},
    {"preadv_verify", preadv_verify, METH_VARARGS, "Read a file range into buffers and check its blocks."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_blockhash", NULL, -1, methods};

PyMODINIT_FUNC PyInit__blockhash(void) { return PyModule_Create(&module); }
