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
 * read_chunk_file() reads a whole chunk file the way the mount's read-ahead wants it: open, O_DIRECT
 * unless the file is already in the page cache, read, check, close, and the checksum file too when
 * the caller has not kept it: one GIL round trip per chunk. Done from Python, each of its dozen
 * system calls gave the GIL back and took it again from the event loop's thread, which holds it while
 * it serves FUSE requests (about 70 futex calls per chunk, 18,000 per GiB of `dd`).
 *
 * recv_verify() is the same for chunk data arriving over TCP (kvfs.rpc_blocking): receive, and hash each
 * block as soon as it is whole, in one call per reply.
 *
 * read_hashed() reads a whole file made of several local chunk files (a KV block) and computes one XXH3-64
 * over a suffix of it (the block's payload) while each window is still in the CPU cache: a caller that
 * checks that one digest against an end-to-end checksum of its own hashes every byte once, not twice
 * (chunk checksums, then its own). Its streaming XXH3 (reset/update/digest) comes from init_stream().
 *
 * The hash function itself is not compiled here: kvfs.xxh3_impls picks one XXH3_64bits (an AVX-512 or
 * AVX2 build from kvfs._xxh3_simd where the CPU has it, else python-xxhash's own SSE2 build, found with
 * ctypes) and hands its address and name to init(); impl() says which one is active. Built as an
 * optional extension: without a compiler kvfs falls back to Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <limits.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

typedef uint64_t (*xxh3_fn)(const void *, size_t);
#define WINDOW (1024 * 1024) /* preadv_verify reads this much, then hashes it while it is in cache */
static xxh3_fn xxh3 = NULL;
static char xxh3_name[32] = "";

/* init(address, name="unnamed"): hash with the XXH3_64bits at address from now on. */
static PyObject *init(PyObject *self, PyObject *args) {
    PyObject *address;
    const char *name = "unnamed";
    if (!PyArg_ParseTuple(args, "O|s", &address, &name))
        return NULL;
    void *fn = PyLong_AsVoidPtr(address);
    if (fn == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "null hash function");
        return NULL;
    }
    xxh3 = (xxh3_fn)fn;
    snprintf(xxh3_name, sizeof xxh3_name, "%s", name);
    Py_RETURN_NONE;
}

static PyObject *impl(PyObject *self, PyObject *unused) {
    if (xxh3 == NULL)
        Py_RETURN_NONE;
    return PyUnicode_FromString(xxh3_name);
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

/* Where fill_and_verify() gets its bytes: a file (preadv from an offset) or a socket (recvmsg, waiting
 * with poll until a deadline). Both return what arrived, 0 at end of stream, or -errno. */
typedef struct {
    int fd;
    long long offset;      /* file: where byte 0 of the range is */
    int is_socket;
    struct timespec deadline;  /* socket: give up (ETIMEDOUT) when nothing has arrived by then */
} source_t;

static long long ms_until(const struct timespec *t) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)(t->tv_sec - now.tv_sec) * 1000 + (t->tv_nsec - now.tv_nsec) / 1000000;
}

static ssize_t source_read(source_t *src, struct iovec *iov, int cnt, Py_ssize_t done) {
    if (!src->is_socket) {
        for (;;) {
            ssize_t r = preadv(src->fd, iov, cnt, (off_t)(src->offset + done));
            if (r >= 0) return r;
            if (errno != EINTR) return -errno;
        }
    }
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)cnt;
    for (;;) {
        ssize_t r = recvmsg(src->fd, &msg, MSG_DONTWAIT);
        if (r >= 0) return r;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return -errno;
        long long left = ms_until(&src->deadline);
        if (left <= 0) return -ETIMEDOUT;
        struct pollfd pfd = {src->fd, POLLIN, 0};
        int p = poll(&pfd, 1, left > INT_MAX ? INT_MAX : (int)left);
        if (p < 0 && errno != EINTR) return -errno;
        if (p == 0) return -ETIMEDOUT;
    }
}

/* The iovecs for the next ``left`` bytes of ``views`` from the cursor (vi, vpos), at most 1024 of them;
 * returns how many. */
static int next_iov(Py_buffer *views, Py_ssize_t n, Py_ssize_t vi, Py_ssize_t vpos, Py_ssize_t left,
                    struct iovec *iov) {
    int cnt = 0;
    while (left > 0 && cnt < 1024 && vi < n) {
        Py_ssize_t avail = views[vi].len - vpos;
        if (avail <= 0) { vi++; vpos = 0; continue; }
        Py_ssize_t take = avail < left ? avail : left;
        iov[cnt].iov_base = (char *)views[vi].buf + vpos;
        iov[cnt].iov_len = (size_t)take;
        cnt++;
        left -= take;
        vpos += take;
    }
    return cnt;
}

/* Advance the cursor (*vi, *vpos) into ``views`` past ``r`` bytes (what a read brought). */
static void advance_cursor(Py_buffer *views, Py_ssize_t *vi, Py_ssize_t *vpos, Py_ssize_t r) {
    while (r > 0) {
        Py_ssize_t avail = views[*vi].len - *vpos;
        if (avail <= 0) { (*vi)++; *vpos = 0; continue; }
        Py_ssize_t take = avail < r ? avail : r;
        *vpos += take;
        r -= take;
    }
}

/* Fill ``views`` (``want`` bytes in all) from ``src`` in windows of at most ``window`` bytes, hashing
 * each block of the bytes that arrived right after it arrived, while it is still in the CPU cache (one
 * pass over memory fewer than receiving everything first; many threads at once are bound by memory
 * bandwidth). Stops at the first bad block. *total: bytes that arrived; *bad: the first block that
 * differs from ``sums`` or has no checksum, else -1. Returns 0 or an errno (end of stream is no error:
 * *total tells). Runs without the GIL. */
static int fill_and_verify(source_t *src, Py_buffer *views, Py_ssize_t n, struct iovec *iov, Py_ssize_t want,
                           const unsigned char *sums, Py_ssize_t nsums, Py_ssize_t block, Py_ssize_t window,
                           unsigned char *scratch, Py_ssize_t *total_out, Py_ssize_t *bad_out) {
    Py_ssize_t total = 0, bad = -1, hashed = 0;
    Py_ssize_t rvi = 0, rvpos = 0;  /* read cursor: buffer, offset in it */
    Py_ssize_t hvi = 0, hvpos = 0;  /* hash cursor */
    int err = 0, eof = 0;
    while (!err && bad < 0 && total < want && !eof) {
        Py_ssize_t goal = total + window;
        if (goal > want) goal = want;
        while (total < goal) {
            int cnt = next_iov(views, n, rvi, rvpos, goal - total, iov);
            ssize_t r = source_read(src, iov, cnt, total);
            if (r < 0) { err = (int)-r; break; }
            if (r == 0) { eof = 1; break; }
            total += r;
            advance_cursor(views, &rvi, &rvpos, r);
            if (src->is_socket) break;  /* hash what a receive brought before waiting for more */
        }
        /* Whole blocks read so far, and the short last one once nothing more will come. */
        int last = eof || total >= want || err;
        while (!err && bad < 0 && hashed < total && (total - hashed >= block || last)) {
            Py_ssize_t i = hashed / block, len = total - hashed;
            if (len > block) len = block;
            if (i >= nsums || hash_span(views, n, &hvi, &hvpos, len, scratch) != load_le64(sums + 8 * i))
                bad = i;
            hashed += len;
        }
    }
    *total_out = total;
    *bad_out = bad;
    return err;
}

/* The shared body of preadv_verify() and recv_verify(): take the buffers, run fill_and_verify without
 * the GIL, return (nread, bad) or raise OSError. */
static PyObject *fill_call(source_t *src, PyObject *seq, Py_buffer *sums, Py_ssize_t block, Py_ssize_t window) {
    PyObject *fast = PySequence_Fast(seq, "bufs must be a sequence of writable buffers");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast), taken = 0;
    Py_buffer *views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    struct iovec *iov = PyMem_Calloc(n < 1024 ? (n ? n : 1) : 1024, sizeof(struct iovec));
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
        want += views[taken].len;
    }
    Py_ssize_t total = 0, bad = -1;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = fill_and_verify(src, views, n, iov, want, (const unsigned char *)sums->buf, sums->len / 8, block, window,
                          scratch, &total, &bad);
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
    return result;
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
    source_t src = {fd, offset, 0, {0, 0}};
    PyObject *result = fill_call(&src, seq, &sums, block, WINDOW);
    PyBuffer_Release(&sums);
    return result;
}

/* recv_verify(fd, bufs, sums, block, timeout) -> (nread, bad)
 * preadv_verify() for a connected stream socket: receive until ``bufs`` are full or the peer ends the
 * stream (nread then tells how much came), checking each block as soon as it is whole. ``timeout``
 * (seconds) bounds the whole call: TimeoutError (ETIMEDOUT) when the bytes have not all arrived by then.
 * The socket may be blocking or not (receives never block: poll waits). The GIL is released for the
 * whole call, so the copy out of the kernel, the hashing and the waiting all run in parallel threads. */
static PyObject *recv_verify(PyObject *self, PyObject *args) {
    int fd;
    PyObject *seq;
    Py_buffer sums;
    Py_ssize_t block;
    double timeout;
    if (xxh3 == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "init() not called");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "iOy*nd", &fd, &seq, &sums, &block, &timeout))
        return NULL;
    source_t src = {fd, 0, 1, {0, 0}};
    clock_gettime(CLOCK_MONOTONIC, &src.deadline);
    if (timeout < 0) timeout = 0;
    if (timeout > 1e6) timeout = 1e6;
    long long ns = (long long)(timeout * 1e9) + src.deadline.tv_nsec;
    src.deadline.tv_sec += (time_t)(ns / 1000000000);
    src.deadline.tv_nsec = (long)(ns % 1000000000);
    PyObject *result = fill_call(&src, seq, &sums, block, PY_SSIZE_T_MAX / 2);
    PyBuffer_Release(&sums);
    return result;
}

/* Streaming XXH3-64 (python-xxhash's library exports it; kvfs.chunkio finds it with ctypes). */
typedef void *(*state_create_fn)(void);
typedef int (*state_free_fn)(void *);
typedef int (*state_reset_fn)(void *);
typedef int (*state_update_fn)(void *, const void *, size_t);
typedef uint64_t (*state_digest_fn)(const void *);
static state_create_fn st_create = NULL;
static state_free_fn st_free = NULL;
static state_reset_fn st_reset = NULL;
static state_update_fn st_update = NULL;
static state_digest_fn st_digest = NULL;

/* init_stream(create, free, reset, update, digest): addresses of XXH3_createState, XXH3_freeState,
 * XXH3_64bits_reset, XXH3_64bits_update and XXH3_64bits_digest. */
static PyObject *init_stream(PyObject *self, PyObject *args) {
    PyObject *a[5];
    void *fn[5];
    if (!PyArg_ParseTuple(args, "OOOOO", &a[0], &a[1], &a[2], &a[3], &a[4]))
        return NULL;
    for (int i = 0; i < 5; i++) {
        fn[i] = PyLong_AsVoidPtr(a[i]);
        if (fn[i] == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "null hash function");
            return NULL;
        }
    }
    st_create = (state_create_fn)fn[0];
    st_free = (state_free_fn)fn[1];
    st_reset = (state_reset_fn)fn[2];
    st_update = (state_update_fn)fn[3];
    st_digest = (state_digest_fn)fn[4];
    Py_RETURN_NONE;
}

#define HASH_WINDOW (256 * 1024) /* read_hashed reads this much, then hashes it while it is in L2 */

/* Feed bytes [from, to) of the concatenation of ``views`` to the hash state; (*vi, *vpos, *pos) is a
 * cursor into the views at concatenation offset *pos <= from, advanced to ``to``. */
static void hash_range(void *state, Py_buffer *views, Py_ssize_t n, Py_ssize_t *vi, Py_ssize_t *vpos,
                       Py_ssize_t *pos, Py_ssize_t from, Py_ssize_t to) {
    while (*pos < to && *vi < n) {
        Py_ssize_t avail = views[*vi].len - *vpos;
        if (avail <= 0) { (*vi)++; *vpos = 0; continue; }
        Py_ssize_t take = to - *pos < avail ? to - *pos : avail;
        Py_ssize_t skip = *pos < from ? (from - *pos < take ? from - *pos : take) : 0;
        if (take > skip)
            st_update(state, (const char *)views[*vi].buf + *vpos + skip, (size_t)(take - skip));
        *vpos += take;
        *pos += take;
    }
}

/* The body of read_hashed() without the GIL: fill ``views`` from the files in order (``lengths[i]``
 * bytes from the start of file i), hashing bytes from ``hash_from`` on, one window at a time right
 * after it arrived. Stops at the first file that is short (*total tells) or fails (returns its errno,
 * *failed its index). */
static int read_files_hashed(char **paths, Py_ssize_t *lengths, Py_ssize_t nfiles, Py_buffer *views, Py_ssize_t n,
                             struct iovec *iov, Py_ssize_t hash_from, void *state, Py_ssize_t *total_out,
                             Py_ssize_t *failed) {
    Py_ssize_t total = 0;
    Py_ssize_t rvi = 0, rvpos = 0;                 /* read cursor */
    Py_ssize_t hvi = 0, hvpos = 0, hpos = 0;       /* hash cursor */
    int err = 0;
    for (Py_ssize_t f = 0; f < nfiles && !err; f++) {
        int fd;
        do { fd = open(paths[f], O_RDONLY | O_CLOEXEC); } while (fd < 0 && errno == EINTR);
        if (fd < 0) { err = errno; *failed = f; break; }
        Py_ssize_t done = 0, want = lengths[f];
        while (done < want) {
            Py_ssize_t left = want - done < HASH_WINDOW ? want - done : HASH_WINDOW;
            int cnt = next_iov(views, n, rvi, rvpos, left, iov);
            ssize_t r;
            do { r = preadv(fd, iov, cnt, (off_t)done); } while (r < 0 && errno == EINTR);
            if (r < 0) { err = errno; *failed = f; break; }
            if (r == 0) break;  /* a short file: *total tells the caller */
            done += r;
            total += r;
            advance_cursor(views, &rvi, &rvpos, r);
            hash_range(state, views, n, &hvi, &hvpos, &hpos, hash_from, total);
        }
        close(fd);
        if (done < want)
            break;
    }
    *total_out = total;
    return err;
}

/* read_hashed(paths, lengths, bufs, hash_from) -> (nread, digest)
 * Fill the writable buffers ``bufs`` (together sum(lengths) bytes) with the first ``lengths[i]`` bytes
 * of each file ``paths[i]`` in turn, and return how many bytes arrived (less than asked: a file was
 * short; the rest of ``bufs`` is undefined) and the XXH3-64 of bytes [hash_from, nread) of them. Nothing
 * is checked here: the caller compares the digest with a checksum of its own. OSError for a file that
 * does not open or read (its filename set). The GIL is released for the whole call. */
static PyObject *read_hashed(PyObject *self, PyObject *args) {
    PyObject *path_seq, *len_seq, *buf_seq;
    Py_ssize_t hash_from;
    if (st_create == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "init_stream() not called");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOOn", &path_seq, &len_seq, &buf_seq, &hash_from))
        return NULL;
    PyObject *pfast = PySequence_Fast(path_seq, "paths must be a sequence");
    PyObject *lfast = pfast ? PySequence_Fast(len_seq, "lengths must be a sequence") : NULL;
    PyObject *bfast = lfast ? PySequence_Fast(buf_seq, "bufs must be a sequence of writable buffers") : NULL;
    PyObject *result = NULL;
    Py_ssize_t nfiles = 0, n = 0, ptaken = 0, btaken = 0;
    PyObject **encoded = NULL;
    char **paths = NULL;
    Py_ssize_t *lengths = NULL;
    Py_buffer *views = NULL;
    struct iovec *iov = NULL;
    void *state = NULL;
    if (bfast == NULL)
        goto done;
    nfiles = PySequence_Fast_GET_SIZE(pfast);
    n = PySequence_Fast_GET_SIZE(bfast);
    if (PySequence_Fast_GET_SIZE(lfast) != nfiles) {
        PyErr_SetString(PyExc_ValueError, "one length per path");
        goto done;
    }
    encoded = PyMem_Calloc(nfiles ? nfiles : 1, sizeof(PyObject *));
    paths = PyMem_Calloc(nfiles ? nfiles : 1, sizeof(char *));
    lengths = PyMem_Calloc(nfiles ? nfiles : 1, sizeof(Py_ssize_t));
    views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    iov = PyMem_Calloc(n < 1024 ? (n ? n : 1) : 1024, sizeof(struct iovec));
    state = st_create();
    if (!encoded || !paths || !lengths || !views || !iov || !state) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t want = 0, room = 0;
    for (; ptaken < nfiles; ptaken++) {
        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(pfast, ptaken), &encoded[ptaken]))
            goto done;
        paths[ptaken] = PyBytes_AS_STRING(encoded[ptaken]);
        lengths[ptaken] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(lfast, ptaken));
        if (lengths[ptaken] < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "negative length");
            ptaken++;
            goto done;
        }
        want += lengths[ptaken];
    }
    for (; btaken < n; btaken++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(bfast, btaken), &views[btaken], PyBUF_WRITABLE) < 0)
            goto done;
        room += views[btaken].len;
    }
    if (room != want || hash_from < 0) {
        PyErr_SetString(PyExc_ValueError, "bufs must hold exactly sum(lengths) bytes, hash_from >= 0");
        goto done;
    }
    Py_ssize_t total = 0, failed = -1;
    int err;
    uint64_t digest;
    Py_BEGIN_ALLOW_THREADS
    st_reset(state);
    err = read_files_hashed(paths, lengths, nfiles, views, n, iov, hash_from, state, &total, &failed);
    digest = st_digest(state);
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, PySequence_Fast_GET_ITEM(pfast, failed));
        goto done;
    }
    result = Py_BuildValue("nK", total, (unsigned long long)digest);
done:
    for (Py_ssize_t i = 0; i < btaken; i++)
        PyBuffer_Release(&views[i]);
    for (Py_ssize_t i = 0; i < ptaken; i++)
        Py_XDECREF(encoded ? encoded[i] : NULL);
    if (state)
        st_free(state);
    PyMem_Free(encoded);
    PyMem_Free(paths);
    PyMem_Free(lengths);
    PyMem_Free(views);
    PyMem_Free(iov);
    Py_XDECREF(bfast);
    Py_XDECREF(lfast);
    Py_XDECREF(pfast);
    return result;
}

/* Whether the first ``length`` bytes of the open file are all in the page cache (cachestat, Linux 6.5+:
 * it starts no I/O, unlike a RWF_NOWAIT read). 0 where the kernel lacks it. */
#ifndef __NR_cachestat
#define __NR_cachestat 451  /* the generic syscall table: x86-64 and arm64 alike */
#endif
static int cachestat_works = 1;
static int all_cached(int fd, Py_ssize_t length) {
    struct { uint64_t off, len; } range = {0, (uint64_t)length};
    struct { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; } st;
    if (!cachestat_works || length <= 0)
        return 0;
    if (syscall(__NR_cachestat, fd, &range, &st, 0) != 0) {
        if (errno == ENOSYS || errno == EPERM)
            cachestat_works = 0;  /* an older kernel or a seccomp filter: always read direct */
        return 0;
    }
    return st.nr_cache * (uint64_t)sysconf(_SC_PAGESIZE) >= (uint64_t)length;
}

/* The whole (small) file at ``path`` into a malloc'd buffer. 0 or an errno. */
static int slurp(const char *path, unsigned char **out, Py_ssize_t *len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    struct stat sb;
    int err = 0;
    Py_ssize_t got = 0;
    unsigned char *buf = NULL;
    if (fstat(fd, &sb) != 0) {
        err = errno;
        goto out;
    }
    buf = malloc(sb.st_size > 0 ? (size_t)sb.st_size : 1);
    if (buf == NULL) {
        err = ENOMEM;
        goto out;
    }
    while (got < sb.st_size) {
        ssize_t r = pread(fd, buf + got, (size_t)(sb.st_size - got), got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { err = errno; break; }
        if (r == 0) break;
        got += r;
    }
out:
    close(fd);
    if (err) {
        free(buf);
        return err;
    }
    *out = buf;
    *len = got;
    return 0;
}

/* read_chunk_file(path, buf, length, sums, sums_path, block) -> (file_length, nread, bad, sums, direct)
 * Read the chunk file at ``path`` from its start into the writable buffer ``buf`` and check the blocks
 * of its first ``length`` bytes against ``sums`` (little-endian u64 per ``block``; None: read them from
 * ``sums_path`` and return them). Unless those bytes are all in the page cache, the file is read with
 * O_DIRECT (``direct``: True) when ``buf`` is page-aligned and whole pages long and the file system
 * takes it: the disk's DMA is the only copy, in one request for the whole buffer. ``nread``: bytes
 * read (at most len(buf)); ``bad``: the first block of the first ``length`` bytes that differs or has
 * no checksum, else -1. The caller judges short files (nread < length). OSError for a failed open or
 * read. The GIL is released for the whole call. */
static PyObject *read_chunk_file(PyObject *self, PyObject *args) {
    PyObject *path_obj, *sums_obj, *sums_path_obj, *result = NULL;
    Py_buffer buf, sums = {0};
    Py_ssize_t length, block;
    if (xxh3 == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "init() not called");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O&w*nOO&n", PyUnicode_FSConverter, &path_obj, &buf, &length, &sums_obj,
                          PyUnicode_FSConverter, &sums_path_obj, &block))
        return NULL;
    unsigned char *read_sums = NULL;
    Py_ssize_t nsums_bytes = 0;
    int have_sums = sums_obj != Py_None;
    if (block <= 0 || length < 0 || length > buf.len) {
        PyErr_SetString(PyExc_ValueError, "need 0 < block and 0 <= length <= len(buf)");
        goto done;
    }
    if (have_sums && PyObject_GetBuffer(sums_obj, &sums, PyBUF_SIMPLE) < 0)
        goto done;
    const char *path = PyBytes_AS_STRING(path_obj), *sums_path = PyBytes_AS_STRING(sums_path_obj);
    long page = sysconf(_SC_PAGESIZE);
    int aligned = (uintptr_t)buf.buf % (uintptr_t)page == 0 && buf.len % page == 0;
    int err = 0, direct = 0;
    Py_ssize_t got = 0, bad = -1, file_length = 0;
    Py_BEGIN_ALLOW_THREADS
    if (!have_sums) {
        err = slurp(sums_path, &read_sums, &nsums_bytes);
    }
    int fd = err ? -1 : open(path, O_RDONLY | O_CLOEXEC);
    if (!err && fd < 0)
        err = errno;
    if (!err) {
        struct stat sb;
        if (fstat(fd, &sb) != 0)
            err = errno;
        else
            file_length = sb.st_size;
        if (!err && aligned && !all_cached(fd, length)) {
            int flags = fcntl(fd, F_GETFL);
            direct = flags >= 0 && fcntl(fd, F_SETFL, flags | O_DIRECT) == 0;  /* tmpfs may refuse: buffered */
        }
    }
    const unsigned char *expect = have_sums ? (const unsigned char *)sums.buf : read_sums;
    Py_ssize_t nsums = (have_sums ? sums.len : nsums_bytes) / 8, hashed = 0;
    /* Direct: one request for the whole buffer. Buffered: a window at a time, hashed while in cache. */
    Py_ssize_t window = direct ? buf.len : WINDOW;
    while (!err && bad < 0 && got < buf.len) {
        Py_ssize_t goal = got + window < buf.len ? got + window : buf.len;
        int eof = 0;
        while (got < goal) {
            ssize_t r = pread(fd, (char *)buf.buf + got, (size_t)(goal - got), got);
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) { err = errno; break; }
            if (r == 0) { eof = 1; break; }
            got += r;
            if (direct && r % page) { eof = 1; break; }  /* the end of the file: a next read would be unaligned */
        }
        Py_ssize_t upto = got < length ? got : length;
        int last = eof || got >= length;
        while (!err && bad < 0 && hashed < upto && (upto - hashed >= block || last)) {
            Py_ssize_t i = hashed / block, len = upto - hashed;
            if (len > block) len = block;
            if (i >= nsums || xxh3((const char *)buf.buf + hashed, (size_t)len) != load_le64(expect + 8 * i))
                bad = i;
            hashed += len;
        }
        if (eof || got >= length)
            break;
    }
    if (fd >= 0)
        close(fd);
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path_obj);
        goto done;
    }
    PyObject *sums_out = have_sums ? (Py_INCREF(sums_obj), sums_obj)
                                   : PyBytes_FromStringAndSize((const char *)read_sums, nsums_bytes);
    if (sums_out != NULL)
        result = Py_BuildValue("nnnNO", file_length, got, bad, sums_out, direct ? Py_True : Py_False);
done:
    free(read_sums);
    if (have_sums && sums.obj != NULL)
        PyBuffer_Release(&sums);
    PyBuffer_Release(&buf);
    Py_DECREF(path_obj);
    Py_DECREF(sums_path_obj);
    return result;
}

static PyMethodDef methods[] = {
    {"init", init, METH_VARARGS, "init(address, name): set the XXH3_64bits function used by the other functions."},
    {"impl", impl, METH_NOARGS, "The name given to init() with the active hash function, or None."},
    {"first_mismatch", first_mismatch, METH_VARARGS, "Index of the first block whose checksum differs, or -1."},
    {"hash_blocks", hash_blocks, METH_VARARGS, "Little-endian u64 XXH3 of every block."},
    {"preadv_verify", preadv_verify, METH_VARARGS, "Read a file range into buffers and check its blocks."},
    {"read_chunk_file", read_chunk_file, METH_VARARGS, "Read a whole chunk file (O_DIRECT unless cached) and check it."},
    {"recv_verify", recv_verify, METH_VARARGS, "Receive from a socket into buffers and check each block as it lands."},
    {"init_stream", init_stream, METH_VARARGS, "init_stream(create, free, reset, update, digest): streaming XXH3-64."},
    {"read_hashed", read_hashed, METH_VARARGS, "Read files in turn into buffers and XXH3-64 a suffix of the bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_blockhash", NULL, -1, methods};

PyMODINIT_FUNC PyInit__blockhash(void) { return PyModule_Create(&module); }
