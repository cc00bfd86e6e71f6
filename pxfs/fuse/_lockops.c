/* FUSE lock requests (GETLK, SETLK/SETLKW, flock) for pyfuse3 mounts.
 *
 * Why: pyfuse3 registers no lock handlers, so libfuse never asks the kernel
 * for FUSE_CAP_POSIX_LOCKS / FUSE_CAP_FLOCK_LOCKS and the kernel keeps every
 * lock to itself: two nodes could both "hold" the same lock file.  libfuse
 * turns those capabilities on when the operations table passed to
 * fuse_session_new() has the handlers.
 *
 * How: this module defines fuse_session_new().  pxfs.fuse loads it with
 * RTLD_GLOBAL before pyfuse3, so pyfuse3's call binds here (the global scope
 * is searched before a module's own libraries).  When a handler has been set
 * (set_handler), the table pyfuse3 passes is copied, the lock operations are
 * added, flush and release are wrapped to report the lock owner the kernel
 * sends with them (pyfuse3 drops it), write and write_buf are wrapped to mark
 * appending writes (below), and libfuse's own fuse_session_new() is called
 * with the copy.  Without a handler nothing is changed.
 *
 * Appending writes: the kernel sends an O_APPEND write at the end of file it
 * cached, which another mount may have moved, so pxfs appends at the end it
 * knows.  Whether a write appends is the file's O_APPEND flag as the kernel
 * sends it with that very write (fcntl(F_SETFL) may have changed it since
 * the open), and never for a write-back of mmap'ed pages (writepage), which
 * goes through any writable open file of the inode.  pyfuse3 passes neither
 * on, so such a write reaches Python with APPEND_FH set in its fh.
 *
 * fallocate: pyfuse3 has no handler for it either, so a loop device over a
 * block volume's image could not pass discards on (fstrim, blkdiscard): the
 * first one failed with ENOSYS and the kernel turned discard off.  When a
 * fallocate handler has been set (set_fallocate_handler), the table gets a
 * fallocate operation that passes (req, ino, fh, mode, offset, length) to it;
 * it answers through reply_err().  Lock and fallocate handlers are set
 * independently: a node's block view takes fallocate only, a shared
 * volume's mount locks only.
 *
 * The lock handlers run where libfuse calls every handler: inside
 * fuse_session_process_buf() on pyfuse3's trio thread.  They pass the request
 * to the Python handler, which answers later through reply_err() and
 * reply_lock(); a waiting SETLKW whose caller gets a signal is reported with
 * kind "interrupt".
 */
#define PY_SSIZE_T_CLEAN
#define FUSE_USE_VERSION 35
#include <Python.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/file.h>
#include <fuse3/fuse_lowlevel.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);

static PyObject *handler = NULL;        /* handler(kind, req, ino, fh, owner, a, b, c, d) */
static PyObject *falloc_handler = NULL; /* falloc_handler(req, ino, fh, mode, offset, length) */
static struct fuse_lowlevel_ops ops;
static void (*orig_flush)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static void (*orig_release)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static void (*orig_write)(fuse_req_t, fuse_ino_t, const char *, size_t, off_t,
                          struct fuse_file_info *);
static void (*orig_write_buf)(fuse_req_t, fuse_ino_t, struct fuse_bufvec *, off_t,
                              struct fuse_file_info *);
#define APPEND_FH (1ULL << 62)          /* pxfs's own fh numbers stay far below */
static int sessions = 0;                /* sessions made with the lock operations */
static int falloc_sessions = 0;         /* ... and with fallocate */

/* Call the Python handler; a handler that raises fails the request. */
static int call(const char *kind, fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
                long long a, long long b, long long c, long long d)
{
    PyGILState_STATE g = PyGILState_Ensure();
    int ok = 0;
    if (handler) {
        PyObject *r = PyObject_CallFunction(handler, "sKKKKLLLL", kind,
                                            (unsigned long long)(uintptr_t)req,
                                            (unsigned long long)ino,
                                            (unsigned long long)(fi ? fi->fh : 0),
                                            (unsigned long long)(fi ? fi->lock_owner : 0),
                                            a, b, c, d);
        if (r) {
            ok = 1;
            Py_DECREF(r);
        } else {
            PyErr_WriteUnraisable(handler);
        }
    }
    PyGILState_Release(g);
    return ok;
}

static void px_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                         struct fuse_file_info *fi)
{
    PyGILState_STATE g = PyGILState_Ensure();
    int ok = 0;
    if (falloc_handler) {
        PyObject *r = PyObject_CallFunction(falloc_handler, "KKKiLL",
                                            (unsigned long long)(uintptr_t)req,
                                            (unsigned long long)ino,
                                            (unsigned long long)(fi ? fi->fh : 0), mode,
                                            (long long)offset, (long long)length);
        if (r) {
            ok = 1;
            Py_DECREF(r);
        } else {
            PyErr_WriteUnraisable(falloc_handler);
        }
    }
    PyGILState_Release(g);
    if (!ok)
        fuse_reply_err(req, EIO);
}

/* struct flock (as libfuse hands it over) -> inclusive byte range */
static long long lock_end(const struct flock *lk)
{
    return lk->l_len == 0 ? INT64_MAX : (long long)(lk->l_start + lk->l_len - 1);
}

static void interrupted(fuse_req_t req, void *data)
{
    (void)data;
    call("interrupt", req, 0, NULL, 0, 0, 0, 0);
}

static void px_getlk(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, struct flock *lk)
{
    if (!call("getlk", req, ino, fi, lk->l_type, lk->l_start, lock_end(lk), lk->l_pid))
        fuse_reply_err(req, EIO);
}

static void px_setlk(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, struct flock *lk,
                     int sleep)
{
    if (sleep)
        fuse_req_interrupt_func(req, interrupted, NULL);
    if (!call(sleep ? "setlkw" : "setlk", req, ino, fi, lk->l_type, lk->l_start, lock_end(lk),
              lk->l_pid))
        fuse_reply_err(req, EIO);
}

static void px_flock(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, int op)
{
    int type = (op & LOCK_UN) ? F_UNLCK : (op & LOCK_EX) ? F_WRLCK : F_RDLCK;
    int sleep = !(op & LOCK_NB) && type != F_UNLCK;
    if (sleep)
        fuse_req_interrupt_func(req, interrupted, NULL);
    if (!call(sleep ? "flockw" : "flock", req, ino, fi, type, 0, INT64_MAX, 0))
        fuse_reply_err(req, EIO);
}

/* close(): the kernel sends the closing process's lock owner; its POSIX
 * locks on the file go before pyfuse3's flush handler answers. */
static void px_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    call("flush", NULL, ino, fi, 0, 0, 0, 0);
    if (orig_flush)
        orig_flush(req, ino, fi);
    else
        fuse_reply_err(req, ENOSYS);
}

/* last close of an open file: its flock goes with it */
static void px_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (fi && fi->flock_release)
        call("release", NULL, ino, fi, 0, 0, 0, 0);
    if (orig_release)
        orig_release(req, ino, fi);
    else
        fuse_reply_err(req, 0);
}

/* fi as pyfuse3 should see it: fh marked when this write appends */
static const struct fuse_file_info *appending(const struct fuse_file_info *fi,
                                              struct fuse_file_info *copy)
{
    if (!fi || !(fi->flags & O_APPEND) || fi->writepage)
        return fi;
    *copy = *fi;
    copy->fh |= APPEND_FH;
    return copy;
}

static void px_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    struct fuse_file_info copy;
    orig_write(req, ino, buf, size, off, (struct fuse_file_info *)appending(fi, &copy));
}

static void px_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv, off_t off,
                         struct fuse_file_info *fi)
{
    struct fuse_file_info copy;
    orig_write_buf(req, ino, bufv, off, (struct fuse_file_info *)appending(fi, &copy));
}

__attribute__((visibility("default")))
struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    static session_new_fn real = NULL;
    if (!real) {
        void *lib = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_GLOBAL);
        if (lib) {
            real = (session_new_fn)dlvsym(lib, "fuse_session_new", "FUSE_3.0");
            if (!real)
                real = (session_new_fn)dlsym(lib, "fuse_session_new");
        }
        if (!real)
            return NULL;
    }
    if (!handler && !falloc_handler)
        return real(args, op, op_size, userdata);
    memset(&ops, 0, sizeof ops);
    memcpy(&ops, op, op_size < sizeof ops ? op_size : sizeof ops);
    if (falloc_handler)
        ops.fallocate = px_fallocate;
    if (!handler)
        goto make;
    orig_flush = ops.flush;
    orig_release = ops.release;
    ops.getlk = px_getlk;
    ops.setlk = px_setlk;
    ops.flock = px_flock;
    ops.flush = px_flush;
    ops.release = px_release;
    orig_write = ops.write;
    orig_write_buf = ops.write_buf;
    if (orig_write)
        ops.write = px_write;
    if (orig_write_buf)
        ops.write_buf = px_write_buf;
make:;
    struct fuse_session *se = real(args, &ops, sizeof ops, userdata);
    if (se && handler)
        sessions++;
    if (se && falloc_handler)
        falloc_sessions++;
    return se;
}

/* *slot = fn (a callable, or None for none) */
static PyObject *store_handler(PyObject **slot, PyObject *fn)
{
    if (fn != Py_None && !PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "handler must be callable or None");
        return NULL;
    }
    Py_CLEAR(*slot);
    if (fn != Py_None) {
        Py_INCREF(fn);
        *slot = fn;
    }
    Py_RETURN_NONE;
}

static PyObject *set_handler(PyObject *self, PyObject *fn)
{
    (void)self;
    return store_handler(&handler, fn);
}

static PyObject *set_fallocate_handler(PyObject *self, PyObject *fn)
{
    (void)self;
    return store_handler(&falloc_handler, fn);
}

static PyObject *reply_err(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long req;
    int err;
    if (!PyArg_ParseTuple(args, "Ki", &req, &err))
        return NULL;
    int r = fuse_reply_err((fuse_req_t)(uintptr_t)req, err);
    return PyLong_FromLong(r);
}

static PyObject *reply_lock(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long req;
    int type, pid;
    long long start, end;
    if (!PyArg_ParseTuple(args, "KiLLi", &req, &type, &start, &end, &pid))
        return NULL;
    struct flock lk;
    memset(&lk, 0, sizeof lk);
    lk.l_type = type;
    lk.l_whence = SEEK_SET;
    lk.l_start = start;
    lk.l_len = end == INT64_MAX ? 0 : end - start + 1;
    lk.l_pid = pid;
    int r = fuse_reply_lock((fuse_req_t)(uintptr_t)req, &lk);
    return PyLong_FromLong(r);
}

static PyObject *installed(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromLong(sessions);
}

static PyObject *fallocate_installed(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromLong(falloc_sessions);
}

static PyMethodDef methods[] = {
    {"set_handler", set_handler, METH_O,
     "Handle lock requests of FUSE sessions made from now on (None: leave them to the kernel)."},
    {"set_fallocate_handler", set_fallocate_handler, METH_O,
     "Handle fallocate requests of FUSE sessions made from now on (None: ENOSYS as before)."},
    {"reply_err", reply_err, METH_VARARGS,
     "reply_err(req, errno): answer a lock or fallocate request (0: done)."},
    {"reply_lock", reply_lock, METH_VARARGS,
     "reply_lock(req, type, start, end, pid): answer a GETLK (end inclusive)."},
    {"installed", installed, METH_NOARGS,
     "How many FUSE sessions were made with the lock operations."},
    {"fallocate_installed", fallocate_installed, METH_NOARGS,
     "How many FUSE sessions were made with the fallocate operation."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lockops", NULL, -1, methods};

PyMODINIT_FUNC PyInit__lockops(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddObject(m, "APPEND_FH", PyLong_FromUnsignedLongLong(APPEND_FH)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
