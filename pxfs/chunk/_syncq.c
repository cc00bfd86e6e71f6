/* Native worker threads for the chunk store's syncs (pxfs.chunk._syncq).
 *
 * Why: a sync of a chunk file or two takes ~0.15 ms on a small VM.  Run on
 * the trio thread it stops the node's event loop for that long; handed to a
 * Python worker thread (trio.to_thread) the GIL goes back and forth between
 * the worker and the busy event loop, and the flush behind a 4 KiB write
 * took twice as long (0.21 -> 0.41 ms).  These threads never take the GIL:
 * the caller hands over a job (a list of steps on file descriptors it keeps
 * open until the job is done), a thread runs it, queues the outcome and
 * signals an eventfd the event loop waits on; reap() collects the outcomes.
 *
 * Steps (run in order, the first error ends the job with its errno):
 *   FDATASYNC  fdatasync(fd)
 *   WRITEBACK  sync_file_range(fd, WAIT_BEFORE | WRITE | WAIT_AFTER)
 *   SYNCFS     syncfs(fd)
 *   FSYNC      fsync(fd)
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

enum { FDATASYNC = 0, WRITEBACK = 1, SYNCFS = 2, FSYNC = 3 };
#define THREADS 4
#define MAX_STEPS 4096

typedef struct job {
    unsigned long long token;
    int n, err;
    struct job *next;
    int steps[];            /* kind, fd, kind, fd, ... */
} job;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static job *todo_head, *todo_tail, *done_head, *done_tail;
static int efd = -1;

static void push(job **head, job **tail, job *j)
{
    j->next = NULL;
    if (*tail)
        (*tail)->next = j;
    else
        *head = j;
    *tail = j;
}

static int step(int kind, int fd)
{
    int r;
    switch (kind) {
    case FDATASYNC:
        r = fdatasync(fd);
        break;
    case WRITEBACK:
        r = sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE
                            | SYNC_FILE_RANGE_WAIT_AFTER);
        break;
    case SYNCFS:
        r = syncfs(fd);
        break;
    case FSYNC:
        r = fsync(fd);
        break;
    default:
        return EINVAL;
    }
    return r ? errno : 0;
}

static void *worker(void *unused)
{
    (void)unused;
    for (;;) {
        pthread_mutex_lock(&mu);
        while (!todo_head)
            pthread_cond_wait(&cv, &mu);
        job *j = todo_head;
        todo_head = j->next;
        if (!todo_head)
            todo_tail = NULL;
        pthread_mutex_unlock(&mu);
        j->err = 0;
        for (int i = 0; i < j->n && !j->err; i++)
            j->err = step(j->steps[2 * i], j->steps[2 * i + 1]);
        pthread_mutex_lock(&mu);
        push(&done_head, &done_tail, j);
        pthread_mutex_unlock(&mu);
        uint64_t one = 1;
        while (write(efd, &one, sizeof one) < 0 && errno == EINTR)
            ;
    }
    return NULL;
}

/* start() -> the eventfd to wait on; the threads start once per process */
static PyObject *start(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    if (efd < 0) {
        int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (fd < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        for (int i = 0; i < THREADS; i++) {
            pthread_t t;
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            pthread_attr_setstacksize(&attr, 64 * 1024);
            int err = pthread_create(&t, &attr, worker, NULL);
            pthread_attr_destroy(&attr);
            if (err) {
                if (i == 0) {
                    close(fd);
                    errno = err;
                    return PyErr_SetFromErrno(PyExc_OSError);
                }
                break;          /* fewer threads still work */
            }
        }
        efd = fd;
    }
    return PyLong_FromLong(efd);
}

/* submit(token, steps): steps a sequence of (kind, fd) */
static PyObject *submit(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long token;
    PyObject *seq;
    if (efd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "start() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "KO", &token, &seq))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "steps must be a sequence of (kind, fd)");
    if (!fast)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > MAX_STEPS) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "too many steps");
        return NULL;
    }
    job *j = malloc(sizeof *j + 2 * (size_t)n * sizeof(int));
    if (!j) {
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    j->token = token;
    j->n = (int)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        int kind, fd;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "ii", &kind, &fd)) {
            free(j);
            Py_DECREF(fast);
            return NULL;
        }
        if (kind < FDATASYNC || kind > FSYNC || fd < 0) {
            free(j);
            Py_DECREF(fast);
            PyErr_SetString(PyExc_ValueError, "bad step");
            return NULL;
        }
        j->steps[2 * i] = kind;
        j->steps[2 * i + 1] = fd;
    }
    Py_DECREF(fast);
    pthread_mutex_lock(&mu);
    push(&todo_head, &todo_tail, j);
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    Py_RETURN_NONE;
}

/* reap() -> [(token, errno)] of the jobs done since the last call */
static PyObject *reap(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    uint64_t count;
    if (efd >= 0 && read(efd, &count, sizeof count) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    pthread_mutex_lock(&mu);
    job *j = done_head;
    done_head = done_tail = NULL;
    pthread_mutex_unlock(&mu);
    PyObject *out = PyList_New(0);
    while (j) {
        job *next = j->next;
        if (out) {
            PyObject *t = Py_BuildValue("(Ki)", j->token, j->err);
            if (!t || PyList_Append(out, t) < 0)
                Py_CLEAR(out);
            Py_XDECREF(t);
        }
        free(j);
        j = next;
    }
    return out;
}

static PyMethodDef methods[] = {
    {"start", start, METH_NOARGS, "Start the threads (once); the eventfd signalled per job done."},
    {"submit", submit, METH_VARARGS, "submit(token, [(kind, fd), ...]): queue a job."},
    {"reap", reap, METH_NOARGS, "[(token, errno)] of the jobs done since the last call."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_syncq", NULL, -1, methods};

PyMODINIT_FUNC PyInit__syncq(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "FDATASYNC", FDATASYNC) < 0
        || PyModule_AddIntConstant(m, "WRITEBACK", WRITEBACK) < 0
        || PyModule_AddIntConstant(m, "SYNCFS", SYNCFS) < 0
        || PyModule_AddIntConstant(m, "FSYNC", FSYNC) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
