/* module.c: blackmamba._C, the one file that touches Python.h.
 *
 * Each op has one body, op_<op>(args, kw, dev), behind two bindings: py_<op> takes NumPy
 * arrays (dev = 0) and, where CUDA is built, py_cuda_<op> takes CUDA device arrays (dev = 1).
 * The body parses the arguments, validates every array at the boundary (dtype, ndim, exact
 * shape by dimension letter, contiguity), allocates the outputs, releases the GIL around
 * the C core call or the CUDA launcher, and maps its status to a Python exception. NumPy
 * inputs that are not C-contiguous are copied, device ones are refused; arrays updated in
 * place must already be C-contiguous and writeable.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>

#include <string.h>

#include "bm.h"

/* ---- argument validation ------------------------------------------------------------- */

#define SIG_MAX_OWNED 24

/* A call's signature state: which binding, dimension letters bound so far, owned arrays. */
typedef struct {
    const char *fn;
    int dev;                      /* 1: py_cuda_<op> (device arrays), 0: py_<op> (NumPy) */
    int math;                     /* GPU: math= of the cuBLAS paths (BM_CUDA_MATH_*, 0 = fp32) */
    int64_t dim[128];             /* dim['E'] = bound size of letter E, -1 while unbound */
    PyObject *owned[SIG_MAX_OWNED];
    int nowned;
} Sig;

enum { ARG_REQUIRED = 0, ARG_OPTIONAL = 1, ARG_INPLACE = 2 };
/* dtype class for arg_in: a NumPy typenum, or WEIGHT = float32 or uint16 (bf16 bits). */
#define DT_WEIGHT (-1)
#define DT_INT (-2) /* integer ids (NumPy: any integer dtype; device: int32 or int64) */
#define DT_ACT (-3) /* device activations: float32, float16 or uint16 (bfloat16 bits) */

static void sig_init(Sig *s, const char *fn, int dev) {
    s->fn = fn;
    s->dev = dev;
    s->math = 0;
    for (int i = 0; i < 128; i++) s->dim[i] = -1;
    s->nowned = 0;
}

static void sig_free(Sig *s) {
    for (int i = 0; i < s->nowned; i++) Py_XDECREF(s->owned[i]);
    s->nowned = 0;
}

static PyObject *sig_own(Sig *s, PyObject *o) {
    if (o == NULL) return NULL;
    if (s->nowned == SIG_MAX_OWNED) {
        Py_DECREF(o);
        PyErr_SetString(PyExc_RuntimeError, "blackmamba: too many arrays in one call");
        return NULL;
    }
    s->owned[s->nowned++] = o;
    return o;
}

static void shape_str(char *buf, size_t n, int ndim, const npy_intp *dims) {
    size_t k = (size_t)snprintf(buf, n, "(");
    for (int i = 0; i < ndim && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, i ? ", %ld" : "%ld", (long)dims[i]);
    if (k < n) snprintf(buf + k, n - k, ndim == 1 ? ",)" : ")");
}

static void spec_str(Sig *s, char *buf, size_t n, const char *shape) {
    size_t k = (size_t)snprintf(buf, n, "(");
    int i = 0;
    for (const char *c = shape; *c && k < n; c++, i++) {
        if (c[0] == '.' && c[1] == '.' && c[2] == '.') {
            k += (size_t)snprintf(buf + k, n - k, "%s...", i ? ", " : "");
            c += 2;
            continue;
        }
        if (s->dim[(int)*c] >= 0)
            k += (size_t)snprintf(buf + k, n - k, "%s%c=%ld", i ? ", " : "", *c,
                                  (long)s->dim[(int)*c]);
        else
            k += (size_t)snprintf(buf + k, n - k, "%s%c", i ? ", " : "", *c);
    }
    if (k < n) snprintf(buf + k, n - k, ")");
}

/* Check dims (nd) against `shape` ("bLE"; a leading "..." allows any leading dims whose
 * product binds letter 'T'), binding unbound letters. Host and device arrays share it. */
static int sig_check_dims(Sig *s, int nd, const npy_intp *dims, const char *name,
                          const char *shape) {
    int lead = strncmp(shape, "...", 3) == 0;
    const char *letters = lead ? shape + 3 : shape;
    int want = (int)strlen(letters);
    int ok = lead ? nd >= want : nd == want;
    int64_t saved[128];
    memcpy(saved, s->dim, sizeof(saved));
    if (ok && lead) {
        int64_t T = 1;
        for (int i = 0; i < nd - want; i++) T *= dims[i];
        if (s->dim['T'] >= 0 && s->dim['T'] != T) ok = 0;
        else s->dim['T'] = T;
    }
    for (int i = 0; ok && i < want; i++) {
        int c = (unsigned char)letters[i];
        npy_intp v = dims[nd - want + i];
        if (s->dim[c] < 0) s->dim[c] = v;
        else if (s->dim[c] != v) ok = 0;
    }
    if (!ok) {
        char want_s[256], got_s[256];
        memcpy(s->dim, saved, sizeof(saved));
        spec_str(s, want_s, sizeof(want_s), shape);
        shape_str(got_s, sizeof(got_s), nd, dims);
        PyErr_Format(PyExc_ValueError, "%s: %s must have shape %s, got %s", s->fn, name, want_s,
                     got_s);
        return -1;
    }
    return 0;
}

static int sig_check_shape(Sig *s, PyArrayObject *a, const char *name, const char *shape) {
    return sig_check_dims(s, PyArray_NDIM(a), PyArray_DIMS(a), name, shape);
}

/* NumPy arguments: sig_arr_get + sig_arr_check (arg_in below picks these or sig_dev_*). */

/* Argument `obj` named `name` as a NumPy array: itself, or converted (owned by s). NULL with
 * an exception on error, without one for an absent optional argument. */
static PyArrayObject *sig_arr_get(Sig *s, PyObject *obj, const char *name, int flags) {
    if (obj == NULL || obj == Py_None) {
        if (flags & ARG_OPTIONAL) return NULL;
        PyErr_Format(PyExc_TypeError, "%s: %s is required", s->fn, name);
        return NULL;
    }
    if (!PyArray_Check(obj)) {
        if (flags & ARG_INPLACE) {
            PyErr_Format(PyExc_TypeError, "%s: %s must be a NumPy array (updated in place)",
                         s->fn, name);
            return NULL;
        }
        obj = PyArray_FromAny(obj, NULL, 0, 0, 0, NULL);
        if (obj == NULL) return NULL;
        if (!sig_own(s, obj)) return NULL;
    }
    return (PyArrayObject *)obj;
}

/* Validate array `a`: dtype class, byte order, shape letters (binding them). Returns a
 * C-contiguous aligned array (a itself, or a copy owned by s), or NULL with an exception.
 * In place (ARG_INPLACE): a itself, which must be C-contiguous, aligned and writeable. */
static PyArrayObject *sig_arr_check(Sig *s, PyArrayObject *a, const char *name, int dtype,
                                    const char *shape, int flags) {
    int t = PyArray_TYPE(a);
    int ok = dtype == DT_WEIGHT ? (t == NPY_FLOAT32 || t == NPY_UINT16)
           : dtype == DT_INT    ? PyArray_ISINTEGER(a)
                                : t == dtype;
    if (!ok) {
        const char *want = dtype == DT_WEIGHT ? "float32 or uint16 (bfloat16 bits)"
                         : dtype == DT_INT    ? "an integer dtype"
                         : dtype == NPY_FLOAT32 ? "float32" : "another dtype";
        PyObject *got = PyObject_Str((PyObject *)PyArray_DESCR(a));
        PyErr_Format(PyExc_TypeError, "%s: %s must be %s, got %S", s->fn, name, want, got);
        Py_XDECREF(got);
        return NULL;
    }
    if (!PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be in native byte order", s->fn, name);
        return NULL;
    }
    if (sig_check_shape(s, a, name, shape) < 0) return NULL;
    if (flags & ARG_INPLACE) {
        if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a) || !PyArray_ISWRITEABLE(a)) {
            PyErr_Format(PyExc_ValueError,
                         "%s: %s is updated in place and must be a C-contiguous, aligned, "
                         "writeable array", s->fn, name);
            return NULL;
        }
        return a;
    }
    if (PyArray_IS_C_CONTIGUOUS(a) && PyArray_ISALIGNED(a)) return a;
    PyObject *c = PyArray_NewCopy(a, NPY_CORDER);
    return (PyArrayObject *)sig_own(s, c);
}

/* New zeroed array of `shape` letters (all bound; "X+" = X + 1). */
static PyArrayObject *sig_new(Sig *s, const char *shape, int typenum) {
    npy_intp dims[8];
    int nd = 0;
    for (const char *c = shape; *c && nd < 8; c++) {
        if (*c == '+') { dims[nd - 1] += 1; continue; } /* "X+" = X + 1 */
        dims[nd++] = (npy_intp)s->dim[(int)*c];
    }
    return (PyArrayObject *)sig_own(s, PyArray_ZEROS(nd, dims, typenum, 0));
}

/* Output with the same leading dims as `like` (T tokens) and last dim `last`. */
static PyArrayObject *sig_new_like(Sig *s, PyArrayObject *like, npy_intp last, int typenum) {
    npy_intp dims[NPY_MAXDIMS];
    int nd = PyArray_NDIM(like);
    memcpy(dims, PyArray_DIMS(like), sizeof(npy_intp) * (size_t)nd);
    if (nd == 0) return NULL;
    dims[nd - 1] = last;
    return (PyArrayObject *)sig_own(s, PyArray_ZEROS(nd, dims, typenum, 0));
}

static PyObject *ret(Sig *s, PyObject *o) { /* new reference to an owned object */
    Py_XINCREF(o);
    return o;
}

static int check_status(Sig *s, bm_status st) {
    if (st == BM_OK) return 0;
    PyObject *exc = st == BM_ERR_NOMEM ? PyExc_MemoryError
                  : st == BM_ERR_ARG   ? PyExc_ValueError
                                       : PyExc_RuntimeError;
    PyErr_Format(exc, "%s: %s", s->fn, bm_status_str(st));
    return -1;
}

/* `stmt` with the GIL released; its status (of type status_t) through `check`, which sets
 * the exception: then goto fail. */
#define GIL_FREE_CALL(status_t, check, stmt)                                                \
    do {                                                                                    \
        status_t st_;                                                                       \
        Py_BEGIN_ALLOW_THREADS st_ = (stmt);                                                \
        Py_END_ALLOW_THREADS if (check(&s, st_) < 0) goto fail;                             \
    } while (0)
/* The C core call `stmt` (a bm_status). */
#define CALL(stmt) GIL_FREE_CALL(bm_status, check_status, stmt)
#define NEED(x) do { if ((x) == NULL) goto fail; } while (0)
#define OPT(x) do { if ((x) == NULL && PyErr_Occurred()) goto fail; } while (0)

static int parse_act(const char *fn, PyObject *o, bm_act *act, int allow_none) {
    if (o == NULL || o == Py_None) {
        if (allow_none) { *act = BM_ACT_NONE; return 0; }
        PyErr_Format(PyExc_ValueError, "%s: activation must be a string", fn);
        return -1;
    }
    const char *a = PyUnicode_Check(o) ? PyUnicode_AsUTF8(o) : NULL;
    if (a && !strcmp(a, "gelu")) *act = BM_ACT_GELU;
    else if (a && !strcmp(a, "gelu_tanh")) *act = BM_ACT_GELU_TANH;
    else if (a && !strcmp(a, "silu")) *act = BM_ACT_SILU;
    else {
        PyErr_Format(PyExc_ValueError,
                     "%s: activation must be 'gelu', 'gelu_tanh' or 'silu'%s, got %R", fn,
                     allow_none ? " or None" : "", o);
        return -1;
    }
    return 0;
}

/* Integer ids (NumPy) -> int32 array owned by s, each in [0, X) (X = s->dim['X']). */
static PyObject *host_ids_int32(Sig *s, PyObject *ids, const char *name) {
    const int64_t X = s->dim['X'];
    PyArrayObject *c = (PyArrayObject *)sig_own(
        s, PyArray_FROMANY(ids, NPY_INT64, 0, 0, NPY_ARRAY_C_CONTIGUOUS));
    if (!c) return NULL;
    npy_intp n = PyArray_SIZE(c);
    const int64_t *p = (const int64_t *)PyArray_DATA(c);
    PyArrayObject *out = (PyArrayObject *)sig_own(
        s, PyArray_EMPTY(PyArray_NDIM(c), PyArray_DIMS(c), NPY_INT32, 0));
    if (!out) return NULL;
    int32_t *o = (int32_t *)PyArray_DATA(out);
    for (npy_intp i = 0; i < n; i++) {
        if (p[i] < 0 || p[i] >= X) {
            PyErr_Format(PyExc_ValueError, "%s: %s[%ld] = %ld is outside [0, %ld)", s->fn, name,
                         (long)i, (long)p[i], (long)X);
            return NULL;
        }
        o[i] = (int32_t)p[i];
    }
    return (PyObject *)out;
}

static int check_blas_dims(Sig *s, int64_t a, int64_t b, int64_t c) {
    if (a > INT32_MAX || b > INT32_MAX || c > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: matrix dimensions must be below 2**31", s->fn);
        return -1;
    }
    return 0;
}

/* ---- cpu.c ----------------------------------------------------------------------------- */

static PyObject *py_cpu_info(PyObject *self, PyObject *noargs) {
    return Py_BuildValue("{s:O,s:O,s:O,s:i,s:O}", "avx512", bm_cpu_has_avx512() ? Py_True : Py_False,
                         "avx512bf16", bm_cpu_has_avx512bf16() ? Py_True : Py_False,
                         "avx2", bm_cpu_has_avx2() ? Py_True : Py_False,
                         "threads", bm_get_num_threads(), "cuda",
#ifdef BM_WITH_CUDA
                         Py_True
#else
                         Py_False
#endif
    );
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 4096) return PyErr_Format(PyExc_ValueError, "set_num_threads: n must be in 1..4096, got %ld", n);
    bm_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *noargs) {
    return PyLong_FromLong(bm_get_num_threads());
}

/* ==== CUDA: device arrays ============================================================== */
#ifdef BM_WITH_CUDA
/* The GPU side of the bindings' machinery, in one section:
 *   - DLPack's ABI structs (dlpack.h 1.0, a public ABI-stable spec, written out here);
 *   - device memory: stream-ordered cudaMallocAsync on the legacy default stream, plain
 *     cudaMalloc where the device has no memory pools (or BLACKMAMBA_CUDA_ALLOC=sync);
 *   - blackmamba._C.DeviceArray: a C-contiguous device array owning its memory, or a view
 *     that keeps a foreign owner alive; __cuda_array_interface__ (v3) and __dlpack__ out;
 *   - foreign GPU arrays in (CAI, then DLPack) as DeviceArray views, never copies;
 *   - sig_dev_*: the Sig validation above, for device arrays (the same shape letters);
 *   - cuBLAS handles, math=, and the module functions of devices, memory and arrays.
 * The ops themselves (one body for _C.<op> and _C.cuda_<op>) follow this section.
 * Every launch goes on the legacy default stream (BM_STREAM). It orders itself after and
 * before all blocking streams (CuPy's and PyTorch's default streams), so callers need no
 * synchronisation; the host waits only where it needs a value (iteration counts, id range
 * checks, numpy()). Foreign memory is used in the call only: a temporary whose owner frees
 * it right after the call is safe when that owner allocates on a blocking stream. */
#include <cuda_runtime_api.h>

#include "../cuda/bm_cuda.h"

#define BM_STREAM cudaStreamLegacy
#define DA_MAXDIM 16

/* ---- DLPack (dlpack.h v1.0) ---- */
enum { kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13 };
enum { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4, kDLBool = 6 };
typedef struct { int32_t device_type; int32_t device_id; } DLDevice;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;
typedef struct {
    void *data;          /* device pointer (+ byte_offset) */
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;      /* (ndim) */
    int64_t *strides;    /* (ndim) in elements, or NULL for compact row-major */
    uint64_t byte_offset;
} DLTensor;
typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;
typedef struct { uint32_t major, minor; } DLPackVersion;
typedef struct DLManagedTensorVersioned {
    DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensorVersioned *self);
    uint64_t flags;
    DLTensor dl_tensor;
} DLManagedTensorVersioned;
#define DLPACK_FLAG_BITMASK_READ_ONLY (1ULL << 0)

/* Element types a DeviceArray may hold: NumPy type <-> DLPack code and bits. bf16 comes in
 * from DLPack as uint16 bits (the weight convention of every op). */
static const struct { int typenum; char kind; uint8_t code, bits; } da_types[] = {
    {NPY_FLOAT32, 'f', kDLFloat, 32}, {NPY_FLOAT64, 'f', kDLFloat, 64},
    {NPY_FLOAT16, 'f', kDLFloat, 16}, {NPY_INT8, 'i', kDLInt, 8},
    {NPY_INT16, 'i', kDLInt, 16},     {NPY_INT32, 'i', kDLInt, 32},
    {NPY_INT64, 'i', kDLInt, 64},     {NPY_UINT8, 'u', kDLUInt, 8},
    {NPY_UINT16, 'u', kDLUInt, 16},   {NPY_UINT32, 'u', kDLUInt, 32},
    {NPY_UINT64, 'u', kDLUInt, 64},   {NPY_BOOL, 'b', kDLBool, 8},
};
#define DA_NTYPES ((int)(sizeof(da_types) / sizeof(da_types[0])))

/* Canonical type number of a NumPy dtype (int64 and longlong are one type here), or -1. */
static int da_typenum(PyArray_Descr *d) {
    for (int i = 0; i < DA_NTYPES; i++)
        if (da_types[i].kind == d->kind && da_types[i].bits == 8 * PyDataType_ELSIZE(d))
            return da_types[i].typenum;
    return -1;
}

static int da_typenum_dl(DLDataType t) {
    if (t.lanes != 1) return -1;
    if (t.code == kDLBfloat && t.bits == 16) return NPY_UINT16;
    for (int i = 0; i < DA_NTYPES; i++)
        if (da_types[i].code == t.code && da_types[i].bits == t.bits) return da_types[i].typenum;
    return -1;
}

static int cur_device(void) {
    int d = 0;
    if (cudaGetDevice(&d) != cudaSuccess) {
        (void)cudaGetLastError();
        d = 0;
    }
    return d;
}

/* ---- device memory ---- */
enum { DA_NONE = 0, DA_SYNC = 1, DA_ASYNC = 2 };  /* how a DeviceArray's memory was taken */
static int da_alloc_mode = DA_NONE;  /* DA_SYNC or DA_ASYNC once chosen; set under the GIL */

static int alloc_mode(void) {
    if (da_alloc_mode) return da_alloc_mode;
    const char *env = getenv("BLACKMAMBA_CUDA_ALLOC");
    int mode = DA_ASYNC, pools = 0;
    if (env && !strcmp(env, "sync")) mode = DA_SYNC;
    else if (cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, cur_device()) !=
                 cudaSuccess || !pools)
        mode = DA_SYNC;
    (void)cudaGetLastError();
    return da_alloc_mode = mode;
}

static void set_alloc_error(const char *fn, cudaError_t e, size_t bytes) {
    if (e == cudaErrorMemoryAllocation) {
        size_t fr = 0, tot = 0;
        if (cudaMemGetInfo(&fr, &tot) != cudaSuccess) (void)cudaGetLastError();
        const double gib = 1024.0 * 1024.0 * 1024.0;
        char buf[400];
        snprintf(buf, sizeof buf,
                 "%s: out of GPU memory: cannot allocate %zu bytes (%.3f GiB); the device has "
                 "%zu bytes (%.3f GiB) free of %zu (%.3f GiB)",
                 fn, bytes, bytes / gib, fr, fr / gib, tot, tot / gib);
        PyErr_SetString(PyExc_MemoryError, buf);
    } else if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) {
        PyErr_Format(PyExc_RuntimeError, "%s: no usable CUDA GPU (%s: %s)", fn,
                     cudaGetErrorName(e), cudaGetErrorString(e));
    } else {
        PyErr_Format(PyExc_RuntimeError, "%s: cannot allocate %zu bytes of GPU memory: %s: %s",
                     fn, bytes, cudaGetErrorName(e), cudaGetErrorString(e));
    }
}

/* `bytes` of device memory in *ptr (NULL for 0 bytes). Returns how it was taken (DA_*), or
 * -1 with MemoryError (naming the bytes and the free/total memory) or RuntimeError set. */
static int dev_malloc(const char *fn, size_t bytes, void **ptr) {
    *ptr = NULL;
    if (bytes == 0) return DA_NONE;
    cudaError_t e;
    if (alloc_mode() == DA_ASYNC) {
        e = cudaMallocAsync(ptr, bytes, BM_STREAM);
        if (e == cudaSuccess) return DA_ASYNC;
        (void)cudaGetLastError();  /* a failed call leaves its error for the next launch check */
        if (e == cudaErrorMemoryAllocation) goto fail;
        da_alloc_mode = DA_SYNC;   /* pools refused: plain allocations from now on */
    }
    e = cudaMalloc(ptr, bytes);
    if (e == cudaSuccess) return DA_SYNC;
    (void)cudaGetLastError();
fail:
    *ptr = NULL;
    set_alloc_error(fn, e, bytes);
    return -1;
}

static void dev_free(void *ptr, int kind) {
    if (!ptr || kind == DA_NONE) return;
    /* stream-ordered: kernels still reading it on BM_STREAM (or on blocking streams before
     * this point) finish first. Errors (a runtime already unloaded at exit) are dropped. */
    cudaError_t e = kind == DA_ASYNC ? cudaFreeAsync(ptr, BM_STREAM) : cudaFree(ptr);
    if (e != cudaSuccess) (void)cudaGetLastError();
}

/* ---- DeviceArray ---- */
typedef struct {
    PyObject_HEAD
    char *ptr;                  /* device memory, C-contiguous; NULL when size is 0 */
    npy_intp shape[DA_MAXDIM];  /* (ndim) */
    int ndim;
    int typenum;                /* canonical NumPy type number (da_types) */
    int itemsize;
    int device;                 /* CUDA device ordinal */
    int readonly;
    int alloc;                  /* DA_NONE (a view, or empty), DA_SYNC, DA_ASYNC */
    PyObject *base;             /* owner of the memory of a view, else NULL */
} DeviceArray;

static PyTypeObject DeviceArrayType;
#define DeviceArray_Check(o) (Py_TYPE(o) == &DeviceArrayType)

static npy_intp da_size(const DeviceArray *a) {
    npy_intp n = 1;
    for (int i = 0; i < a->ndim; i++) n *= a->shape[i];
    return n;
}

static size_t da_nbytes(const DeviceArray *a) { return (size_t)da_size(a) * (size_t)a->itemsize; }

/* A DeviceArray object with no memory yet; shape checked (ndim, sizes >= 0, no overflow). */
static DeviceArray *da_new(const char *fn, int ndim, const npy_intp *shape, int typenum) {
    if (ndim < 0 || ndim > DA_MAXDIM) {
        PyErr_Format(PyExc_ValueError, "%s: device arrays have at most %d dimensions, got %d",
                     fn, DA_MAXDIM, ndim);
        return NULL;
    }
    PyArray_Descr *d = PyArray_DescrFromType(typenum);
    if (!d) return NULL;
    const int itemsize = (int)PyDataType_ELSIZE(d);
    Py_DECREF(d);
    npy_intp n = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: negative dimension %ld", fn, (long)shape[i]);
            return NULL;
        }
        if (shape[i] && n > NPY_MAX_INTP / shape[i] / itemsize) {
            PyErr_Format(PyExc_ValueError, "%s: array is too big", fn);
            return NULL;
        }
        n *= shape[i];
    }
    DeviceArray *a = PyObject_New(DeviceArray, &DeviceArrayType);
    if (!a) return NULL;
    a->ptr = NULL;
    memset(a->shape, 0, sizeof(a->shape));
    memcpy(a->shape, shape, sizeof(npy_intp) * (size_t)ndim);
    a->ndim = ndim;
    a->typenum = typenum;
    a->itemsize = itemsize;
    a->device = cur_device();
    a->readonly = 0;
    a->alloc = DA_NONE;
    a->base = NULL;
    return a;
}

/* New uninitialised device array (new reference). */
static DeviceArray *da_empty(const char *fn, int ndim, const npy_intp *shape, int typenum) {
    DeviceArray *a = da_new(fn, ndim, shape, typenum);
    if (!a) return NULL;
    void *p;
    const int kind = dev_malloc(fn, da_nbytes(a), &p);
    if (kind < 0) {
        Py_DECREF(a);
        return NULL;
    }
    a->ptr = (char *)p;
    a->alloc = kind;
    return a;
}

/* A view of memory owned by `base` (a new reference to base is kept). */
static DeviceArray *da_view(const char *fn, PyObject *base, void *ptr, int ndim,
                            const npy_intp *shape, int typenum, int device, int readonly) {
    DeviceArray *a = da_new(fn, ndim, shape, typenum);
    if (!a) return NULL;
    a->ptr = da_size(a) ? (char *)ptr : NULL;
    a->device = device;
    a->readonly = readonly;
    Py_XINCREF(base);
    a->base = base;
    return a;
}

static void da_dealloc(DeviceArray *a) {
    dev_free(a->ptr, a->alloc);
    Py_XDECREF(a->base);
    Py_TYPE(a)->tp_free((PyObject *)a);
}

static PyObject *da_shape_tuple(const DeviceArray *a) {
    PyObject *t = PyTuple_New(a->ndim);
    if (!t) return NULL;
    for (int i = 0; i < a->ndim; i++) {
        PyObject *v = PyLong_FromSsize_t(a->shape[i]);
        if (!v) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

static PyObject *da_get_shape(DeviceArray *a, void *c) { return da_shape_tuple(a); }
static PyObject *da_get_dtype(DeviceArray *a, void *c) { return (PyObject *)PyArray_DescrFromType(a->typenum); }
static PyObject *da_get_ndim(DeviceArray *a, void *c) { return PyLong_FromLong(a->ndim); }
static PyObject *da_get_size(DeviceArray *a, void *c) { return PyLong_FromSsize_t(da_size(a)); }
static PyObject *da_get_nbytes(DeviceArray *a, void *c) { return PyLong_FromSize_t(da_nbytes(a)); }
static PyObject *da_get_ptr(DeviceArray *a, void *c) { return PyLong_FromVoidPtr(a->ptr); }
static PyObject *da_get_device(DeviceArray *a, void *c) { return PyLong_FromLong(a->device); }
static PyObject *da_get_readonly(DeviceArray *a, void *c) { return PyBool_FromLong(a->readonly); }
static PyObject *da_get_base(DeviceArray *a, void *c) {
    PyObject *b = a->base ? a->base : Py_None;
    Py_INCREF(b);
    return b;
}

/* __cuda_array_interface__ v3: C-contiguous (strides None); stream 1 = the legacy default
 * stream, where our writes may still be pending (v3 forbids 0; None would claim there is no
 * pending work). */
static PyObject *da_get_cai(DeviceArray *a, void *c) {
    PyArray_Descr *d = PyArray_DescrFromType(a->typenum);
    if (!d) return NULL;
    char typestr[8];
    snprintf(typestr, sizeof typestr, "%c%c%d", a->itemsize == 1 ? '|' : '<', d->kind,
             a->itemsize);
    Py_DECREF(d);
    return Py_BuildValue("{s:N,s:s,s:(N,O),s:O,s:i,s:i}", "shape", da_shape_tuple(a),
                         "typestr", typestr, "data", PyLong_FromVoidPtr(a->ptr),
                         a->readonly ? Py_True : Py_False, "strides", Py_None, "version", 3,
                         "stream", 1);
}

static PyObject *da_repr(DeviceArray *a) {
    PyObject *shape = da_shape_tuple(a);
    PyObject *dt = (PyObject *)PyArray_DescrFromType(a->typenum);
    PyObject *r = NULL;
    if (shape && dt)
        r = PyUnicode_FromFormat("DeviceArray(shape=%R, dtype=%S, device='cuda:%d'%s)", shape, dt,
                                 a->device, a->base ? ", view" : "");
    Py_XDECREF(shape);
    Py_XDECREF(dt);
    return r;
}

/* numpy(): a host copy (waits for pending work on the legacy stream). */
static PyObject *da_numpy(DeviceArray *a, PyObject *noargs) {
    PyObject *out = PyArray_EMPTY(a->ndim, a->shape, a->typenum, 0);
    if (!out) return NULL;
    const size_t n = da_nbytes(a);
    if (n) {
        cudaError_t e;
        Py_BEGIN_ALLOW_THREADS
        e = cudaMemcpy(PyArray_DATA((PyArrayObject *)out), a->ptr, n, cudaMemcpyDeviceToHost);
        Py_END_ALLOW_THREADS
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            Py_DECREF(out);
            return PyErr_Format(PyExc_RuntimeError, "DeviceArray.numpy: cudaMemcpy: %s: %s",
                                cudaGetErrorName(e), cudaGetErrorString(e));
        }
    }
    return out;
}

/* A device copy that owns its memory. */
static DeviceArray *da_copy_of(const char *fn, DeviceArray *a) {
    DeviceArray *c = da_empty(fn, a->ndim, a->shape, a->typenum);
    if (!c) return NULL;
    const size_t n = da_nbytes(a);
    if (n) {
        cudaError_t e = cudaMemcpyAsync(c->ptr, a->ptr, n, cudaMemcpyDeviceToDevice, BM_STREAM);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            Py_DECREF(c);
            PyErr_Format(PyExc_RuntimeError, "%s: cudaMemcpyAsync: %s: %s", fn,
                         cudaGetErrorName(e), cudaGetErrorString(e));
            return NULL;
        }
    }
    return c;
}

static PyObject *da_copy(DeviceArray *a, PyObject *noargs) {
    return (PyObject *)da_copy_of("DeviceArray.copy", a);
}

/* Shape from a tuple/list of ints or the ints themselves; one -1 is inferred from `size`
 * (size < 0: no inference). Returns ndim or -1. */
static int parse_shape(const char *fn, PyObject *args, npy_intp *shape, npy_intp size) {
    PyObject *seq = args;
    if (PyTuple_Check(args) && PyTuple_GET_SIZE(args) == 1 && !PyIndex_Check(PyTuple_GET_ITEM(args, 0)))
        seq = PyTuple_GET_ITEM(args, 0);
    PyObject *fast = PySequence_Fast(seq, "shape must be an int or a sequence of ints");
    if (!fast) return -1;
    const Py_ssize_t nd = PySequence_Fast_GET_SIZE(fast);
    int infer = -1;
    npy_intp known = 1;
    if (nd > DA_MAXDIM) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "%s: at most %d dimensions", fn, DA_MAXDIM);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nd; i++) {
        const npy_intp v = PyNumber_AsSsize_t(PySequence_Fast_GET_ITEM(fast, i), PyExc_OverflowError);
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        if (v == -1 && size >= 0 && infer < 0) infer = (int)i;
        else if (v < 0) {
            Py_DECREF(fast);
            PyErr_Format(PyExc_ValueError, "%s: negative dimension %ld", fn, (long)v);
            return -1;
        } else known *= v;
        shape[i] = v;
    }
    Py_DECREF(fast);
    if (infer >= 0) {
        if (known == 0 || size % known) {
            PyErr_Format(PyExc_ValueError, "%s: cannot infer -1 from size %ld", fn, (long)size);
            return -1;
        }
        shape[infer] = size / known;
    }
    return (int)nd;
}

static PyObject *da_reshape(DeviceArray *a, PyObject *args) {
    npy_intp shape[DA_MAXDIM];
    const int nd = parse_shape("DeviceArray.reshape", args, shape, da_size(a));
    if (nd < 0) return NULL;
    npy_intp n = 1;
    for (int i = 0; i < nd; i++) n *= shape[i];
    if (n != da_size(a))
        return PyErr_Format(PyExc_ValueError, "DeviceArray.reshape: cannot reshape size %ld into "
                            "size %ld", (long)da_size(a), (long)n);
    return (PyObject *)da_view("DeviceArray.reshape", (PyObject *)a, a->ptr, nd, shape,
                               a->typenum, a->device, a->readonly);
}

static PyObject *da_array(DeviceArray *a, PyObject *args, PyObject *kw) {
    PyErr_SetString(PyExc_TypeError,
                    "DeviceArray lives in GPU memory: copy it to the host explicitly with "
                    ".numpy()");
    return NULL;
}

/* ---- DLPack out ---- */
typedef struct {                  /* one allocation per export */
    DLManagedTensor m;
    int64_t shape[DA_MAXDIM], strides[DA_MAXDIM];
} DLExport;
typedef struct {
    DLManagedTensorVersioned m;
    int64_t shape[DA_MAXDIM], strides[DA_MAXDIM];
} DLExportV;

/* The deleter may run on any thread, with or without the GIL. At interpreter exit the
 * reference is leaked rather than touched. */
static void dl_export_free(PyObject *owner, void *block) {
    if (!Py_IsInitialized()) return;
    PyGILState_STATE g = PyGILState_Ensure();
    Py_XDECREF(owner);
    PyMem_RawFree(block);
    PyGILState_Release(g);
}
static void dl_deleter(DLManagedTensor *m) { dl_export_free((PyObject *)m->manager_ctx, m); }
static void dl_deleter_v(DLManagedTensorVersioned *m) { dl_export_free((PyObject *)m->manager_ctx, m); }

/* A capsule not consumed ("dltensor" still) releases the tensor itself. */
static void dl_capsule_free(PyObject *cap) {
    if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *m = (DLManagedTensor *)PyCapsule_GetPointer(cap, "dltensor");
        if (m && m->deleter) m->deleter(m);
    } else if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        DLManagedTensorVersioned *m =
            (DLManagedTensorVersioned *)PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (m && m->deleter) m->deleter(m);
    }
}

static void dl_fill(DLTensor *t, int64_t *shape, int64_t *strides, DeviceArray *a) {
    int64_t st = 1;
    for (int i = a->ndim - 1; i >= 0; i--) {
        shape[i] = a->shape[i];
        strides[i] = st;
        st *= a->shape[i];
    }
    t->data = a->ptr;
    t->device.device_type = kDLCUDA;
    t->device.device_id = a->device;
    t->ndim = a->ndim;
    for (int i = 0; i < DA_NTYPES; i++)
        if (da_types[i].typenum == a->typenum) {
            t->dtype.code = da_types[i].code;
            t->dtype.bits = da_types[i].bits;
        }
    t->dtype.lanes = 1;
    t->shape = shape;
    t->strides = strides;
    t->byte_offset = 0;
}

/* __dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None). The consumer
 * will use the data on `stream`: None/1 (legacy default) and 2 (per-thread default, a
 * blocking stream) are ordered after our work already; -1 asks for nothing; any other
 * stream may be non-blocking, so the legacy stream is synchronised first. */
static PyObject *da_dlpack(DeviceArray *a, PyObject *args, PyObject *kw) {
    static char *kws[] = {"stream", "max_version", "dl_device", "copy", NULL};
    PyObject *ostream = Py_None, *omax = Py_None, *odev = Py_None, *ocopy = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$OOOO", kws, &ostream, &omax, &odev, &ocopy))
        return NULL;
    if (ostream != Py_None) {
        long long sv = PyLong_AsLongLong(ostream);
        if (sv == -1 && PyErr_Occurred()) return NULL;
        if (sv != -1 && sv != 0 && sv != 1 && sv != 2) {
            cudaError_t e;
            Py_BEGIN_ALLOW_THREADS
            e = cudaStreamSynchronize(BM_STREAM);
            Py_END_ALLOW_THREADS
            if (e != cudaSuccess) {
                (void)cudaGetLastError();
                return PyErr_Format(PyExc_RuntimeError, "__dlpack__: %s: %s", cudaGetErrorName(e),
                                    cudaGetErrorString(e));
            }
        }
    }
    if (odev != Py_None) {
        int dt, di;
        if (!PyArg_ParseTuple(odev, "ii", &dt, &di)) return NULL;
        if (dt != kDLCUDA || di != a->device)
            return PyErr_Format(PyExc_BufferError, "__dlpack__: DeviceArray is on (%d, %d) "
                                "(kDLCUDA), cannot export to device (%d, %d)", kDLCUDA,
                                a->device, dt, di);
    }
    int versioned = 0;
    if (omax != Py_None) {
        int major, minor;
        if (!PyArg_ParseTuple(omax, "ii", &major, &minor)) return NULL;
        versioned = major >= 1;
    }
    DeviceArray *src = a;
    int copied = ocopy != Py_None && PyObject_IsTrue(ocopy) == 1;
    if (copied) {
        if (!(src = da_copy_of("__dlpack__", a))) return NULL;
    } else {
        Py_INCREF(src);
    }
    PyObject *cap;
    if (versioned) {
        DLExportV *x = (DLExportV *)PyMem_RawCalloc(1, sizeof(DLExportV));
        if (!x) { Py_DECREF(src); return PyErr_NoMemory(); }
        x->m.version.major = 1;
        x->m.version.minor = 0;
        x->m.manager_ctx = src;   /* our reference, released by the deleter */
        x->m.deleter = dl_deleter_v;
        x->m.flags = (src->readonly ? DLPACK_FLAG_BITMASK_READ_ONLY : 0) | (copied ? 2ULL : 0);
        dl_fill(&x->m.dl_tensor, x->shape, x->strides, src);
        cap = PyCapsule_New(&x->m, "dltensor_versioned", dl_capsule_free);
        if (!cap) dl_deleter_v(&x->m);
    } else {
        DLExport *x = (DLExport *)PyMem_RawCalloc(1, sizeof(DLExport));
        if (!x) { Py_DECREF(src); return PyErr_NoMemory(); }
        x->m.manager_ctx = src;
        x->m.deleter = dl_deleter;
        dl_fill(&x->m.dl_tensor, x->shape, x->strides, src);
        cap = PyCapsule_New(&x->m, "dltensor", dl_capsule_free);
        if (!cap) dl_deleter(&x->m);
    }
    return cap;
}

static PyObject *da_dlpack_device(DeviceArray *a, PyObject *noargs) {
    return Py_BuildValue("(ii)", kDLCUDA, a->device);
}

static PyGetSetDef da_getset[] = {
    {"shape", (getter)da_get_shape, NULL, "tuple of dimensions", NULL},
    {"dtype", (getter)da_get_dtype, NULL, "NumPy dtype of the elements", NULL},
    {"ndim", (getter)da_get_ndim, NULL, "number of dimensions", NULL},
    {"size", (getter)da_get_size, NULL, "number of elements", NULL},
    {"nbytes", (getter)da_get_nbytes, NULL, "bytes of device memory", NULL},
    {"ptr", (getter)da_get_ptr, NULL, "device pointer as an int (0 when empty)", NULL},
    {"device", (getter)da_get_device, NULL, "CUDA device ordinal", NULL},
    {"readonly", (getter)da_get_readonly, NULL, "True for a view of read-only memory", NULL},
    {"base", (getter)da_get_base, NULL, "owner of the memory of a view, else None", NULL},
    {"__cuda_array_interface__", (getter)da_get_cai, NULL, "CUDA Array Interface, version 3", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef da_methods[] = {
    {"numpy", (PyCFunction)da_numpy, METH_NOARGS, "numpy() -> a host copy (numpy.ndarray)"},
    {"copy", (PyCFunction)da_copy, METH_NOARGS, "copy() -> a device copy that owns its memory"},
    {"reshape", (PyCFunction)da_reshape, METH_VARARGS, "reshape(*shape) -> a view (one -1 allowed)"},
    {"__dlpack__", (PyCFunction)(void (*)(void))da_dlpack, METH_VARARGS | METH_KEYWORDS,
     "__dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None) -> PyCapsule"},
    {"__dlpack_device__", (PyCFunction)da_dlpack_device, METH_NOARGS, "-> (2 (kDLCUDA), device id)"},
    {"__array__", (PyCFunction)(void (*)(void))da_array, METH_VARARGS | METH_KEYWORDS,
     "raises TypeError: use .numpy() for a host copy"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DeviceArrayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "blackmamba._C.DeviceArray",
    .tp_basicsize = sizeof(DeviceArray),
    .tp_dealloc = (destructor)da_dealloc,
    .tp_repr = (reprfunc)da_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A C-contiguous array in CUDA device memory (blackmamba.cuda.to_device, op "
              "results). Exposes __cuda_array_interface__ and __dlpack__; numpy() copies to "
              "the host.",
    .tp_methods = da_methods,
    .tp_getset = da_getset,
};

/* ---- foreign GPU arrays in ---- */

/* Compact row-major? strides in `unit`s; size-1 dimensions may carry any stride. */
static int strides_compact(int nd, const npy_intp *shape, const int64_t *strides, int64_t unit) {
    int64_t want = unit;
    for (int i = 0; i < nd; i++)
        if (shape[i] == 0) return 1;
    for (int i = nd - 1; i >= 0; i--) {
        if (shape[i] != 1 && strides[i] != want) return 0;
        want *= shape[i];
    }
    return 1;
}

static PyObject *err_noncontig(const char *fn, const char *name, const char *via) {
    return PyErr_Format(PyExc_ValueError,
                        "%s: %s is a non-contiguous GPU array (%s strides): pass a "
                        "C-contiguous array (e.g. cupy.ascontiguousarray(a), tensor.contiguous())",
                        fn, name, via);
}

static int check_aligned(const char *fn, const char *name, const void *p, int itemsize) {
    if ((uintptr_t)p % (uintptr_t)itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %s's device pointer is not aligned to its %d-byte "
                     "elements", fn, name, itemsize);
        return -1;
    }
    return 0;
}

/* Work on the producer's `stream` (CAI v3) must finish before ours: the legacy default
 * stream (1) and the per-thread default stream (2) are blocking, ordered with our launches
 * already; another stream may be non-blocking: wait for it. */
static int sync_foreign_stream(const char *fn, PyObject *ostream) {
    if (!ostream || ostream == Py_None) return 0;
    const unsigned long long sv = PyLong_AsUnsignedLongLong(ostream);
    if (sv == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (sv <= 2) return 0;
    cudaError_t e;
    Py_BEGIN_ALLOW_THREADS
    e = cudaStreamSynchronize((cudaStream_t)(uintptr_t)sv);
    Py_END_ALLOW_THREADS
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        PyErr_Format(PyExc_RuntimeError, "%s: synchronising the producer's stream: %s: %s", fn,
                     cudaGetErrorName(e), cudaGetErrorString(e));
        return -1;
    }
    return 0;
}

static DeviceArray *da_from_cai(const char *fn, const char *name, PyObject *owner, PyObject *cai) {
    if (!PyDict_Check(cai)) {
        PyErr_Format(PyExc_TypeError, "%s: %s.__cuda_array_interface__ is not a dict", fn, name);
        return NULL;
    }
    PyObject *oshape = PyDict_GetItemString(cai, "shape");      /* borrowed */
    PyObject *otype = PyDict_GetItemString(cai, "typestr");
    PyObject *odata = PyDict_GetItemString(cai, "data");
    PyObject *ostrides = PyDict_GetItemString(cai, "strides");
    PyObject *omask = PyDict_GetItemString(cai, "mask");
    if (!oshape || !otype || !odata || !PyTuple_Check(oshape) || !PyTuple_Check(odata) ||
        PyTuple_GET_SIZE(odata) != 2) {
        PyErr_Format(PyExc_ValueError, "%s: %s has a malformed __cuda_array_interface__", fn, name);
        return NULL;
    }
    if (omask && omask != Py_None) {
        PyErr_Format(PyExc_ValueError, "%s: %s is a masked GPU array (not supported)", fn, name);
        return NULL;
    }
    const int nd = (int)PyTuple_GET_SIZE(oshape);
    if (nd > DA_MAXDIM) {
        PyErr_Format(PyExc_ValueError, "%s: %s has more than %d dimensions", fn, name, DA_MAXDIM);
        return NULL;
    }
    npy_intp shape[DA_MAXDIM];
    int64_t strides[DA_MAXDIM];
    for (int i = 0; i < nd; i++) {
        shape[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(oshape, i));
        if (shape[i] == -1 && PyErr_Occurred()) return NULL;
    }
    PyArray_Descr *descr = NULL;
    if (!PyArray_DescrConverter(otype, &descr)) return NULL;
    const int typenum = PyArray_ISNBO(descr->byteorder) ? da_typenum(descr) : -1;
    const int itemsize = (int)PyDataType_ELSIZE(descr);
    Py_DECREF(descr);
    if (typenum < 0) {
        PyErr_Format(PyExc_TypeError, "%s: %s has an unsupported element type %R", fn, name, otype);
        return NULL;
    }
    if (ostrides && ostrides != Py_None) {
        if (!PyTuple_Check(ostrides) || PyTuple_GET_SIZE(ostrides) != nd) {
            PyErr_Format(PyExc_ValueError, "%s: %s has malformed strides", fn, name);
            return NULL;
        }
        for (int i = 0; i < nd; i++) {
            strides[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(ostrides, i));
            if (strides[i] == -1 && PyErr_Occurred()) return NULL;
        }
        if (!strides_compact(nd, shape, strides, itemsize))
            return (DeviceArray *)err_noncontig(fn, name, "__cuda_array_interface__");
    }
    void *ptr = PyLong_AsVoidPtr(PyTuple_GET_ITEM(odata, 0));
    if (!ptr && PyErr_Occurred()) return NULL;
    const int readonly = PyObject_IsTrue(PyTuple_GET_ITEM(odata, 1));
    if (readonly < 0) return NULL;
    if (check_aligned(fn, name, ptr, itemsize) < 0) return NULL;
    if (sync_foreign_stream(fn, PyDict_GetItemString(cai, "stream")) < 0) return NULL;
    return da_view(fn, owner, ptr, nd, shape, typenum, cur_device(), readonly);
}

/* Keeps an imported DLManagedTensor alive; its destruction calls the producer's deleter. */
static void dl_hold_free(PyObject *cap) {
    DLManagedTensor *m = (DLManagedTensor *)PyCapsule_GetPointer(cap, "blackmamba.dltensor_hold");
    if (m && m->deleter) m->deleter(m);
}

static DeviceArray *da_from_dlpack(const char *fn, const char *name, PyObject *obj) {
    PyObject *meth = PyObject_GetAttrString(obj, "__dlpack__");
    if (!meth) return NULL;
    /* stream=1: the producer makes its data ready for the legacy default stream, ours */
    PyObject *kw = Py_BuildValue("{s:i}", "stream", 1), *empty = PyTuple_New(0), *cap = NULL;
    if (kw && empty) {
        cap = PyObject_Call(meth, empty, kw);
        if (!cap && PyErr_ExceptionMatches(PyExc_TypeError)) {  /* a producer without stream= */
            PyErr_Clear();
            cap = PyObject_Call(meth, empty, NULL);
        }
    }
    Py_DECREF(meth);
    Py_XDECREF(kw);
    Py_XDECREF(empty);
    if (!cap) return NULL;
    DLManagedTensor *m = (DLManagedTensor *)PyCapsule_GetPointer(cap, "dltensor");
    if (!m) {
        Py_DECREF(cap);
        PyErr_Format(PyExc_TypeError, "%s: %s.__dlpack__() did not return a 'dltensor' capsule",
                     fn, name);
        return NULL;
    }
    DLTensor *t = &m->dl_tensor;
    const int dev = cur_device();
    const int typenum = da_typenum_dl(t->dtype);
    npy_intp shape[DA_MAXDIM];
    const char *bad = NULL;
    if (t->device.device_type != kDLCUDA && t->device.device_type != kDLCUDAManaged)
        bad = "is not in CUDA device memory";
    else if (t->device.device_id != dev) bad = "is on another GPU than the current device";
    else if (t->ndim < 0 || t->ndim > DA_MAXDIM) bad = "has too many dimensions";
    else if (typenum < 0) bad = "has an unsupported element type";
    if (bad) {
        Py_DECREF(cap);
        PyErr_Format(t->device.device_type == kDLCUDA || t->device.device_type == kDLCUDAManaged
                         ? PyExc_ValueError : PyExc_TypeError,
                     "%s: %s (DLPack device (%d, %d), dtype code %d bits %d) %s", fn, name,
                     (int)t->device.device_type, (int)t->device.device_id, (int)t->dtype.code,
                     (int)t->dtype.bits, bad);
        return NULL;
    }
    for (int i = 0; i < t->ndim; i++) shape[i] = (npy_intp)t->shape[i];
    if (t->strides && !strides_compact(t->ndim, shape, t->strides, 1)) {
        Py_DECREF(cap);
        return (DeviceArray *)err_noncontig(fn, name, "DLPack");
    }
    char *ptr = (char *)t->data + t->byte_offset;
    PyArray_Descr *d = PyArray_DescrFromType(typenum);
    const int itemsize = (int)PyDataType_ELSIZE(d);
    Py_DECREF(d);
    if (check_aligned(fn, name, ptr, itemsize) < 0) {
        Py_DECREF(cap);
        return NULL;
    }
    /* Consumed: the capsule's own destructor must no longer call the deleter; ours will. */
    if (PyCapsule_SetName(cap, "used_dltensor") < 0) {
        Py_DECREF(cap);
        return NULL;
    }
    Py_DECREF(cap);
    PyObject *hold = PyCapsule_New(m, "blackmamba.dltensor_hold", dl_hold_free);
    if (!hold) {
        if (m->deleter) m->deleter(m);
        return NULL;
    }
    DeviceArray *a = da_view(fn, hold, ptr, t->ndim, shape, typenum, dev, 0);
    Py_DECREF(hold);
    return a;
}

static PyObject *err_host(const char *fn, const char *name, PyObject *obj) {
    return PyErr_Format(PyExc_TypeError,
                        "%s: %s is a host array (%s) but this call runs on the GPU: mixing host "
                        "and device arrays in one call is not supported; move it with "
                        "blackmamba.cuda.to_device() (or the results back with .numpy())",
                        fn, name, Py_TYPE(obj)->tp_name);
}

/* `obj` as a DeviceArray (new reference): itself, or a view of a foreign CUDA array through
 * __cuda_array_interface__, else __dlpack__. Host arrays -> TypeError. */
static DeviceArray *da_from_object(const char *fn, const char *name, PyObject *obj) {
    if (DeviceArray_Check(obj)) {
        Py_INCREF(obj);
        return (DeviceArray *)obj;
    }
    if (PyArray_Check(obj)) return (DeviceArray *)err_host(fn, name, obj);
    PyObject *cai = PyObject_GetAttrString(obj, "__cuda_array_interface__");
    if (cai) {
        DeviceArray *a = da_from_cai(fn, name, obj, cai);
        Py_DECREF(cai);
        if (a || !PyErr_ExceptionMatches(PyExc_TypeError)) return a;
        /* A type CAI cannot name (torch gives bfloat16 as '<V2'): DLPack can, if offered. */
        PyObject *t1, *v1, *tb1;
        PyErr_Fetch(&t1, &v1, &tb1);
        if (!PyObject_HasAttrString(obj, "__dlpack__")) {
            PyErr_Restore(t1, v1, tb1);
            return NULL;
        }
        Py_XDECREF(t1);
        Py_XDECREF(v1);
        Py_XDECREF(tb1);
    }
    /* No usable CAI (absent; or refused, e.g. torch for bfloat16): try DLPack. */
    PyObject *et, *ev, *etb;
    PyErr_Fetch(&et, &ev, &etb);
    if (!PyObject_HasAttrString(obj, "__dlpack__")) {
        if (et && !PyErr_GivenExceptionMatches(et, PyExc_AttributeError)) {
            PyErr_Restore(et, ev, etb);  /* the producer's own complaint */
            return NULL;
        }
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(etb);
        if (PySequence_Check(obj) || PyNumber_Check(obj)) return (DeviceArray *)err_host(fn, name, obj);
        return (DeviceArray *)PyErr_Format(
            PyExc_TypeError, "%s: %s must be a CUDA device array (blackmamba DeviceArray, or an "
            "object with __cuda_array_interface__ or __dlpack__), got %s", fn, name,
            Py_TYPE(obj)->tp_name);
    }
    Py_XDECREF(et);
    Py_XDECREF(ev);
    Py_XDECREF(etb);
    PyObject *dev = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
    if (!dev) return NULL;
    int dt = 0, di = 0;
    const int ok = PyArg_ParseTuple(dev, "ii", &dt, &di);
    Py_DECREF(dev);
    if (!ok) return NULL;
    if (dt != kDLCUDA && dt != kDLCUDAManaged) return (DeviceArray *)err_host(fn, name, obj);
    return da_from_dlpack(fn, name, obj);
}

/* ---- Sig for device arrays ---- */

/* The argument as a DeviceArray owned by s (or the argument itself); NULL with an exception
 * on error, without one for an absent optional argument. */
static DeviceArray *sig_dev_get(Sig *s, PyObject *obj, const char *name, int flags) {
    if (obj == NULL || obj == Py_None) {
        if (flags & ARG_OPTIONAL) return NULL;
        PyErr_Format(PyExc_TypeError, "%s: %s is required", s->fn, name);
        return NULL;
    }
    if (DeviceArray_Check(obj)) return (DeviceArray *)obj;
    return (DeviceArray *)sig_own(s, (PyObject *)da_from_object(s->fn, name, obj));
}

static int sig_dev_check(Sig *s, DeviceArray *a, const char *name, int dtype, const char *shape,
                         int flags) {
    const int t = a->typenum;
    const int ok = dtype == DT_WEIGHT ? (t == NPY_FLOAT32 || t == NPY_UINT16)
                 : dtype == DT_INT    ? (t == NPY_INT32 || t == NPY_INT64)
                 : dtype == DT_ACT    ? (t == NPY_FLOAT32 || t == NPY_FLOAT16 || t == NPY_UINT16)
                                      : t == dtype;
    if (!ok) {
        const char *want = dtype == DT_WEIGHT ? "float32 or uint16 (bfloat16 bits)"
                         : dtype == DT_INT    ? "int32 or int64"
                         : dtype == DT_ACT    ? "float32, float16 or uint16 (bfloat16 bits)"
                         : dtype == NPY_FLOAT32 ? "float32"
                         : dtype == NPY_FLOAT16 ? "float16"
                         : dtype == NPY_UINT16  ? "uint16 (bfloat16 bits)" : "another dtype";
        PyObject *got = (PyObject *)PyArray_DescrFromType(t);
        PyErr_Format(PyExc_TypeError, "%s: %s must be %s, got %S", s->fn, name, want, got);
        Py_XDECREF(got);
        return -1;
    }
    if (a->device != cur_device()) {
        PyErr_Format(PyExc_ValueError, "%s: %s is on cuda:%d but the current device is cuda:%d",
                     s->fn, name, a->device, cur_device());
        return -1;
    }
    if (sig_check_dims(s, a->ndim, a->shape, name, shape) < 0) return -1;
    if ((flags & ARG_INPLACE) && a->readonly) {
        PyErr_Format(PyExc_ValueError, "%s: %s is updated in place and must be writeable", s->fn,
                     name);
        return -1;
    }
    return 0;
}

/* New uninitialised device array of `shape` letters (all bound; "X+" = X + 1). */
static DeviceArray *sig_dev_new(Sig *s, const char *shape, int typenum) {
    npy_intp dims[8];
    int nd = 0;
    for (const char *c = shape; *c && nd < 8; c++) {
        if (*c == '+') { dims[nd - 1] += 1; continue; }
        dims[nd++] = (npy_intp)s->dim[(int)*c];
    }
    return (DeviceArray *)sig_own(s, (PyObject *)da_empty(s->fn, nd, dims, typenum));
}

/* New device array with the leading dims of `like` and last dim `last`. */
static DeviceArray *sig_dev_new_like(Sig *s, DeviceArray *like, npy_intp last, int typenum) {
    npy_intp dims[DA_MAXDIM];
    const int nd = like->ndim > 0 ? like->ndim : 1;
    memcpy(dims, like->shape, sizeof(npy_intp) * (size_t)nd);
    dims[nd - 1] = last;
    return (DeviceArray *)sig_own(s, (PyObject *)da_empty(s->fn, nd, dims, typenum));
}

/* Scratch bytes for a launcher, freed (stream-ordered) when the call ends. */
static DeviceArray *sig_dev_bytes(Sig *s, size_t bytes) {
    npy_intp n = (npy_intp)bytes;
    return (DeviceArray *)sig_own(s, (PyObject *)da_empty(s->fn, 1, &n, NPY_UINT8));
}

/* Launcher status -> exception (MemoryError for an allocation failure, else RuntimeError),
 * with the launcher's "file:line: cudaErrorName: message". */
static int cuda_check(Sig *s, int st) {
    if (st == 0) return 0;
    (void)cudaGetLastError();  /* leave no stale error for the next launch check */
    PyErr_Format(st == (int)cudaErrorMemoryAllocation ? PyExc_MemoryError : PyExc_RuntimeError,
                 "%s: CUDA launcher failed (status %d): %s", s->fn, st, bm_cuda_last_error());
    return -1;
}

/* The launcher call `stmt` (0 or a CUDA / BM_CUDA_ERR_* status). */
#define CUDA_CALL(stmt) GIL_FREE_CALL(int, cuda_check, stmt)

/* Copy `n` bytes from the device to the host, waiting for the legacy stream. */
static int dev_read(Sig *s, void *host, const void *dev, size_t n) {
    cudaError_t e;
    Py_BEGIN_ALLOW_THREADS
    e = cudaMemcpy(host, dev, n, cudaMemcpyDeviceToHost);
    Py_END_ALLOW_THREADS
    if (e == cudaSuccess) return 0;
    (void)cudaGetLastError();
    PyErr_Format(PyExc_RuntimeError, "%s: cudaMemcpy: %s: %s", s->fn, cudaGetErrorName(e),
                 cudaGetErrorString(e));
    return -1;
}

/* ---- cuBLAS handles: a small pool, taken and given back under the GIL ----
 * A handle must not be used by two threads at once, and the GIL is released around the
 * launches: each call takes its own. Handles belong to the device current at creation. */
#define CUBLAS_POOL 8
static struct { void *h; int dev; } cublas_pool[CUBLAS_POOL];
static int cublas_npool = 0;

static void *cublas_take(Sig *s) {
    const int dev = cur_device();
    for (int i = cublas_npool - 1; i >= 0; i--)
        if (cublas_pool[i].dev == dev) {
            void *h = cublas_pool[i].h;
            cublas_pool[i] = cublas_pool[--cublas_npool];
            return h;
        }
    void *h = NULL;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_cublas_create(&h);
    Py_END_ALLOW_THREADS
    if (cuda_check(s, st) < 0) return NULL;
    return h;
}

static void cublas_give(void *h) {
    if (!h) return;
    if (cublas_npool < CUBLAS_POOL) {
        cublas_pool[cublas_npool].h = h;
        cublas_pool[cublas_npool++].dev = cur_device();
    } else {
        (void)bm_cuda_cublas_destroy(h);
    }
}

/* math= of the cuBLAS paths: "fp32" (exact float32, the default), "tf32", "bf16", "bf16x2". */
static int parse_math(const char *fn, PyObject *o, int *math) {
    const char *m = (o == NULL || o == Py_None) ? "fp32" : PyUnicode_Check(o) ? PyUnicode_AsUTF8(o) : NULL;
    if (m && !strcmp(m, "fp32")) *math = BM_CUDA_MATH_FP32;
    else if (m && !strcmp(m, "tf32")) *math = BM_CUDA_MATH_TF32;
    else if (m && !strcmp(m, "bf16")) *math = BM_CUDA_MATH_BF16;
    else if (m && !strcmp(m, "bf16x2")) *math = BM_CUDA_MATH_BF16X2;
    else {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: math must be 'fp32', 'tf32', 'bf16' or 'bf16x2', "
                     "got %R", fn, o);
        return -1;
    }
    return 0;
}

/* ---- module functions: device, memory, arrays ---- */

static PyObject *py_cuda_probe(PyObject *self, PyObject *noargs) {
    int n = 0, drv = 0, rt = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    const char *err = e == cudaSuccess ? NULL : cudaGetErrorName(e);
    if (e != cudaSuccess) n = 0;
    if (cudaDriverGetVersion(&drv) != cudaSuccess) drv = 0;
    if (cudaRuntimeGetVersion(&rt) != cudaSuccess) rt = 0;
    (void)cudaGetLastError();
    return Py_BuildValue("{s:i,s:z,s:i,s:i}", "device_count", n, "error", err, "driver_version",
                         drv, "runtime_version", rt);
}

static PyObject *py_cuda_synchronize(PyObject *self, PyObject *noargs) {
    cudaError_t e;
    Py_BEGIN_ALLOW_THREADS
    e = cudaDeviceSynchronize();
    Py_END_ALLOW_THREADS
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return PyErr_Format(PyExc_RuntimeError, "synchronize: %s: %s", cudaGetErrorName(e),
                            cudaGetErrorString(e));
    }
    Py_RETURN_NONE;
}

static PyObject *py_cuda_mem_info(PyObject *self, PyObject *noargs) {
    size_t fr = 0, tot = 0;
    cudaError_t e = cudaMemGetInfo(&fr, &tot);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return PyErr_Format(PyExc_RuntimeError, "mem_info: %s: %s", cudaGetErrorName(e),
                            cudaGetErrorString(e));
    }
    return Py_BuildValue("(nn)", (Py_ssize_t)fr, (Py_ssize_t)tot);
}

static PyObject *py_cuda_allocator(PyObject *self, PyObject *args) {
    const char *mode = NULL;
    if (!PyArg_ParseTuple(args, "|z", &mode)) return NULL;
    if (mode) {
        if (!strcmp(mode, "async")) da_alloc_mode = DA_ASYNC;
        else if (!strcmp(mode, "sync")) da_alloc_mode = DA_SYNC;
        else return PyErr_Format(PyExc_ValueError, "cuda_allocator: mode must be 'async' or 'sync'");
    }
    return PyUnicode_FromString(alloc_mode() == DA_ASYNC ? "async" : "sync");
}

static int parse_dtype(const char *fn, PyObject *o, int *typenum) {
    PyArray_Descr *d = NULL;
    if (!PyArray_DescrConverter(o, &d)) return -1;
    *typenum = PyArray_ISNBO(d->byteorder) ? da_typenum(d) : -1;
    if (*typenum < 0) PyErr_Format(PyExc_TypeError, "%s: unsupported dtype %S", fn, (PyObject *)d);
    Py_DECREF(d);
    return *typenum < 0 ? -1 : 0;
}

static PyObject *py_cuda_empty(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"shape", "dtype", NULL};
    PyObject *oshape, *odt = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O", kws, &oshape, &odt)) return NULL;
    int typenum = NPY_FLOAT32;
    if (odt && odt != Py_None && parse_dtype("cuda_empty", odt, &typenum) < 0) return NULL;
    npy_intp shape[DA_MAXDIM];
    PyObject *t = PyIndex_Check(oshape) ? PyTuple_Pack(1, oshape) : (Py_INCREF(oshape), oshape);
    if (!t) return NULL;
    const int nd = parse_shape("cuda_empty", t, shape, -1);
    Py_DECREF(t);
    if (nd < 0) return NULL;
    return (PyObject *)da_empty("cuda_empty", nd, shape, typenum);
}

/* 1 if `o` is a GPU array (DeviceArray, CAI, or DLPack on a CUDA device), 0 if not, -1 on
 * error. NumPy arrays are host arrays without a look at their attributes. */
static int is_device_obj(PyObject *o) {
    if (DeviceArray_Check(o)) return 1;
    if (PyArray_Check(o)) return 0;
    if (PyObject_HasAttrString(o, "__cuda_array_interface__")) return 1;
    if (!PyObject_HasAttrString(o, "__dlpack_device__")) return 0;
    PyObject *dev = PyObject_CallMethod(o, "__dlpack_device__", NULL);
    int dt = 0, di = 0;
    const int ok = dev && PyArg_ParseTuple(dev, "ii", &dt, &di);
    Py_XDECREF(dev);
    if (!ok) return -1;
    return dt == kDLCUDA || dt == kDLCUDAManaged;
}

/* to_device(a, dtype=None): a host array copied to the device; a GPU array (DeviceArray,
 * CAI or DLPack) is returned as a DeviceArray without a copy (dtype must then match). */
static PyObject *py_to_device(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"a", "dtype", NULL};
    PyObject *oa, *odt = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O", kws, &oa, &odt)) return NULL;
    int want = -1;
    if (odt != Py_None && parse_dtype("to_device", odt, &want) < 0) return NULL;
    const int on_dev = is_device_obj(oa);
    if (on_dev < 0) return NULL;
    if (on_dev) {
        DeviceArray *a = da_from_object("to_device", "a", oa);
        if (a && want >= 0 && a->typenum != want) {
            Py_DECREF(a);
            return PyErr_Format(PyExc_TypeError, "to_device: a is already on the GPU with "
                                "another dtype (no conversion on the device)");
        }
        return (PyObject *)a;
    }
    PyArray_Descr *d = want >= 0 ? PyArray_DescrFromType(want) : NULL;
    PyArrayObject *h = (PyArrayObject *)PyArray_FromAny(
        oa, d, 0, 0, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_NOTSWAPPED, NULL);
    if (!h) return NULL;
    const int typenum = da_typenum(PyArray_DESCR(h));
    if (typenum < 0) {
        PyErr_Format(PyExc_TypeError, "to_device: unsupported dtype %S", (PyObject *)PyArray_DESCR(h));
        Py_DECREF(h);
        return NULL;
    }
    DeviceArray *a = da_empty("to_device", PyArray_NDIM(h), PyArray_DIMS(h), typenum);
    if (a && da_nbytes(a)) {
        cudaError_t e;
        Py_BEGIN_ALLOW_THREADS
        e = cudaMemcpy(a->ptr, PyArray_DATA(h), da_nbytes(a), cudaMemcpyHostToDevice);
        Py_END_ALLOW_THREADS
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            Py_CLEAR(a);
            PyErr_Format(PyExc_RuntimeError, "to_device: cudaMemcpy: %s: %s", cudaGetErrorName(e),
                         cudaGetErrorString(e));
        }
    }
    Py_DECREF(h);
    return (PyObject *)a;
}

static PyObject *py_cuda_is_device(PyObject *self, PyObject *obj) {
    const int r = is_device_obj(obj);
    return r < 0 ? NULL : PyBool_FromLong(r);
}

static PyObject *py_cuda_asarray(PyObject *self, PyObject *obj) {
    return (PyObject *)da_from_object("cuda_asarray", "a", obj);
}

#endif /* BM_WITH_CUDA: device arrays */

/* ==== the ops: one body for both bindings =============================================== */

/* ---- arguments of either kind ----------------------------------------------------------
 * In an op body an array is a PyObject: a NumPy array (s->dev = 0) or a DeviceArray
 * (s->dev = 1), owned by s or borrowed from the call's arguments. arg_get / arg_check /
 * arg_in pick sig_arr_* or sig_dev_*, which keep each side's own rules: NumPy inputs of
 * any integer dtype as ids, non-contiguous ones copied; device ids int32 or int64,
 * non-contiguous device inputs refused, every array on the current device. */

/* The argument as an array of the call's kind, unchecked (see sig_arr_get, sig_dev_get). */
static PyObject *arg_get(Sig *s, PyObject *obj, const char *name, int flags) {
#ifdef BM_WITH_CUDA
    if (s->dev) return (PyObject *)sig_dev_get(s, obj, name, flags);
#endif
    return (PyObject *)sig_arr_get(s, obj, name, flags);
}

/* Validated `a` (from arg_get), or NULL with an exception (see sig_arr_check, sig_dev_check). */
static PyObject *arg_check(Sig *s, PyObject *a, const char *name, int dtype, const char *shape,
                           int flags) {
#ifdef BM_WITH_CUDA
    if (s->dev) return sig_dev_check(s, (DeviceArray *)a, name, dtype, shape, flags) < 0 ? NULL : a;
#endif
    return (PyObject *)sig_arr_check(s, (PyArrayObject *)a, name, dtype, shape, flags);
}

/* Validated argument `obj` named `name`; NULL with an exception on error, without one for an
 * absent optional argument. */
static PyObject *arg_in(Sig *s, PyObject *obj, const char *name, int dtype, const char *shape,
                        int flags) {
    PyObject *a = arg_get(s, obj, name, flags);
    return a ? arg_check(s, a, name, dtype, shape, flags) : NULL;
}

/* New output of `shape` letters (all bound; "X+" = X + 1): zeroed on the host, left
 * uninitialised on the device (the launchers write every element). */
static PyObject *arg_new(Sig *s, const char *shape, int typenum) {
#ifdef BM_WITH_CUDA
    if (s->dev) return (PyObject *)sig_dev_new(s, shape, typenum);
#endif
    return (PyObject *)sig_new(s, shape, typenum);
}

/* New output with the leading dims of `like` and last dim `last`. */
static PyObject *arg_new_like(Sig *s, PyObject *like, int64_t last, int typenum) {
#ifdef BM_WITH_CUDA
    if (s->dev)
        return (PyObject *)sig_dev_new_like(s, (DeviceArray *)like, (npy_intp)last, typenum);
#endif
    return (PyObject *)sig_new_like(s, (PyArrayObject *)like, (npy_intp)last, typenum);
}

static int arg_ndim(PyObject *a) {
#ifdef BM_WITH_CUDA
    if (DeviceArray_Check(a)) return ((DeviceArray *)a)->ndim;
#endif
    return PyArray_NDIM((PyArrayObject *)a);
}

static const npy_intp *arg_dims(PyObject *a) {
#ifdef BM_WITH_CUDA
    if (DeviceArray_Check(a)) return ((DeviceArray *)a)->shape;
#endif
    return PyArray_DIMS((PyArrayObject *)a);
}

static int arg_type(PyObject *a) {
#ifdef BM_WITH_CUDA
    if (DeviceArray_Check(a)) return ((DeviceArray *)a)->typenum;
#endif
    return PyArray_TYPE((PyArrayObject *)a);
}

static npy_intp arg_size(PyObject *a) {
#ifdef BM_WITH_CUDA
    if (DeviceArray_Check(a)) return da_size((DeviceArray *)a);
#endif
    return PyArray_SIZE((PyArrayObject *)a);
}

/* Data pointer (host or device memory), NULL for an absent optional array. */
static void *arg_ptr(PyObject *a) {
    if (!a) return NULL;
#ifdef BM_WITH_CUDA
    if (DeviceArray_Check(a)) return ((DeviceArray *)a)->ptr;
#endif
    return PyArray_DATA((PyArrayObject *)a);
}

#define DATA(a) arg_ptr(a)
#define F32(a) ((float *)arg_ptr(a))
#define I32(a) ((int32_t *)arg_ptr(a))
#define I64(a) ((int64_t *)arg_ptr(a))
#define U16(a) ((uint16_t *)arg_ptr(a))
#define WDT(a) (arg_type(a) == NPY_UINT16 ? BM_BF16 : BM_F32)

/* An op's GPU side at its call site: `if (s.dev) CUDA_CALL(bm_cuda_...); else CALL(bm_...);`
 * CUDA_CALL (above) launches with the GIL released; CUDA_DO runs one of the dev_* steps
 * below (0, or -1 with an exception set). */
#ifdef BM_WITH_CUDA
#define CUDA_DO(step) do { if ((step) < 0) goto fail; } while (0)
#else
/* Built without CUDA there are no py_cuda_<op> bindings, so no Sig has dev set: the GPU
 * statements of the ops are dropped here, unseen by the compiler. */
#define NO_CUDA                                                                             \
    do {                                                                                    \
        PyErr_SetString(PyExc_SystemError, "blackmamba: this build has no CUDA");           \
        goto fail;                                                                          \
    } while (0)
#define CUDA_CALL(stmt) NO_CUDA
#define CUDA_DO(step) NO_CUDA
#endif

/* The op's two bindings: py_<op> (NumPy arrays) and, where CUDA is built, py_cuda_<op>. */
#ifdef BM_WITH_CUDA
#define BINDINGS(op)                                                                        \
    static PyObject *py_##op(PyObject *self, PyObject *args, PyObject *kw) {                \
        return op_##op(args, kw, 0);                                                        \
    }                                                                                       \
    static PyObject *py_cuda_##op(PyObject *self, PyObject *args, PyObject *kw) {           \
        return op_##op(args, kw, 1);                                                        \
    }
#else
#define BINDINGS(op)                                                                        \
    static PyObject *py_##op(PyObject *self, PyObject *args, PyObject *kw) {                \
        return op_##op(args, kw, 0);                                                        \
    }
#endif

/* ---- GPU steps of the ops: scratch memory, cuBLAS handles, more than one launch, host
 * synchronisations. Each returns 0, or -1 with an exception set. ---- */
#ifdef BM_WITH_CUDA

/* y (T, N) = x (T, K) W^T + b on the GPU: the GEMV up to a few rows (no handle, no
 * workspace), beyond through cuBLAS with a pooled handle. */
static int dev_linear(Sig *s, PyObject *x, PyObject *w, PyObject *b, PyObject *y) {
    const int64_t M = s->dim['T'], N = s->dim['N'], K = s->dim['K'];
    const bm_dtype wdt = WDT(w);
    const size_t wsb = bm_cuda_linear_workspace(M, N, K, wdt, s->math);
    PyObject *ws = NULL;
    void *hdl = NULL;
    if (wsb && !(ws = (PyObject *)sig_dev_bytes(s, wsb))) return -1;
    if (M > bm_cuda_linear_gemv_rows(wdt, s->math) && N > 0 && K > 0 && !(hdl = cublas_take(s)))
        return -1;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_linear(F32(x), DATA(w), wdt, F32(b), F32(y), M, N, K, s->math, DATA(ws), wsb,
                        hdl, BM_STREAM);
    Py_END_ALLOW_THREADS
    const int rc = cuda_check(s, st);
    cublas_give(hdl);
    return rc;
}

/* ids (T, int32 or int64) -> int32 on the device; ids outside [0, X) -> ValueError. The
 * check reads one count back: a host synchronisation. */
static PyObject *dev_ids_int32(Sig *s, PyObject *ids, const char *name) {
    PyObject *out, *bad;
    if (!(out = arg_new(s, "T", NPY_INT32)) || !(bad = arg_new(s, "", NPY_INT32))) return NULL;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_ids_to_i32(DATA(ids), 8 * ((DeviceArray *)ids)->itemsize, s->dim['T'],
                            s->dim['X'], I32(out), I32(bad), BM_STREAM);
    Py_END_ALLOW_THREADS
    if (cuda_check(s, st) < 0) return NULL;
    int32_t nbad = 0;
    if (dev_read(s, &nbad, DATA(bad), sizeof nbad) < 0) return NULL;
    if (nbad) {
        PyErr_Format(PyExc_ValueError, "%s: %s has %d value(s) outside [0, %ld)", s->fn, name,
                     (int)nbad, (long)s->dim['X']);
        return NULL;
    }
    return out;
}

/* The dispatch kernel writes int32 tables; the op returns int64 ones, as the CPU op does. */
static int dev_moe_dispatch(Sig *s, PyObject *ids32, PyObject *counts, PyObject *offsets,
                            PyObject *perm) {
    const int64_t T = s->dim['T'], X = s->dim['X'];
    PyObject *c32, *o32, *p32;
    if (!(c32 = arg_new(s, "X", NPY_INT32)) || !(o32 = arg_new(s, "X+", NPY_INT32)) ||
        !(p32 = arg_new(s, "T", NPY_INT32)))
        return -1;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_moe_dispatch(I32(ids32), T, X, I32(c32), I32(o32), I32(p32), BM_STREAM);
    if (!st) st = bm_cuda_i32_to_i64(I32(c32), I64(counts), X, BM_STREAM);
    if (!st) st = bm_cuda_i32_to_i64(I32(o32), I64(offsets), X + 1, BM_STREAM);
    if (!st) st = bm_cuda_i32_to_i64(I32(p32), I64(perm), T, BM_STREAM);
    Py_END_ALLOW_THREADS
    return cuda_check(s, st);
}

/* Up to this many tokens the experts go through the gathered GEMV (no host sync, each used
 * expert read once per 8 of its tokens); beyond, through cuBLAS (one host sync per call). */
#define MOE_GEMV_TOKENS 64

/* out (T, d) = the expert MLPs of ids32 (valid int32 ids), scaled by gates (or 1). */
static int dev_experts(Sig *s, PyObject *x, PyObject *ids32, PyObject *gates, PyObject *fc1,
                       PyObject *fc2, bm_act act, PyObject *out) {
    const int64_t T = s->dim['T'], d = s->dim['d'], X = s->dim['X'], F = s->dim['F'];
    const bm_dtype wdt = WDT(fc1);
    PyObject *ws;
    void *hdl = NULL;
    int st;
    if (T <= MOE_GEMV_TOKENS) {
        const size_t wsb = bm_cuda_moe_decode_workspace(T, F);
        if (!(ws = (PyObject *)sig_dev_bytes(s, wsb))) return -1;
        Py_BEGIN_ALLOW_THREADS
        st = bm_cuda_moe_experts_decode(F32(x), I32(ids32), F32(gates), DATA(fc1), DATA(fc2), wdt,
                                        act, F32(out), T, d, X, F, DATA(ws), wsb, BM_STREAM);
        Py_END_ALLOW_THREADS
    } else {
        const size_t wsb = bm_cuda_moe_experts_workspace(T, d, X, F, wdt, s->math);
        if (!(ws = (PyObject *)sig_dev_bytes(s, wsb)) || !(hdl = cublas_take(s))) return -1;
        Py_BEGIN_ALLOW_THREADS
        st = bm_cuda_moe_experts(F32(x), I32(ids32), F32(gates), DATA(fc1), DATA(fc2), wdt, act,
                                 s->math, F32(out), T, d, X, F, DATA(ws), wsb, hdl, BM_STREAM);
        Py_END_ALLOW_THREADS
        cublas_give(hdl);
    }
    return cuda_check(s, st);
}

/* The dense gated MLP on the GPU: one expert (X = 1, every id 0, no gate). */
static int dev_mlp(Sig *s, PyObject *x, PyObject *fc1, PyObject *fc2, bm_act act,
                   PyObject *out) {
    s->dim['X'] = 1;
    PyObject *ids = arg_new(s, "T", NPY_INT32);
    if (!ids) return -1;
    const size_t n = (size_t)arg_size(ids) * sizeof(int32_t);
    if (n) {
        cudaError_t e = cudaMemsetAsync(DATA(ids), 0, n, BM_STREAM);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            PyErr_Format(PyExc_RuntimeError, "%s: cudaMemsetAsync: %s: %s", s->fn,
                         cudaGetErrorName(e), cudaGetErrorString(e));
            return -1;
        }
    }
    return dev_experts(s, x, ids, NULL, fc1, fc2, act, out);
}

/* Sinkhorn on the GPU; the iteration count comes back to the host (the one host sync). */
static int dev_sinkhorn(Sig *s, PyObject *S, PyObject *P, float tol, bm_sinkhorn_init init,
                        int max_iters, int *iters) {
    PyObject *it = arg_new(s, "", NPY_INT32);
    if (!it) return -1;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_sinkhorn(F32(S), F32(P), s->dim['T'], s->dim['X'], tol, init, max_iters,
                          (int *)DATA(it), BM_STREAM);
    Py_END_ALLOW_THREADS
    if (cuda_check(s, st) < 0) return -1;
    return dev_read(s, iters, DATA(it), sizeof *iters);
}

#endif /* BM_WITH_CUDA: GPU steps */

/* Integer ids (T) -> int32 ids owned by s, each in [0, X): checked on the host in a loop;
 * on the GPU by a kernel that counts the bad ones (a host synchronisation). */
static PyObject *ids_int32(Sig *s, PyObject *ids, const char *name) {
#ifdef BM_WITH_CUDA
    if (s->dev) return dev_ids_int32(s, ids, name);
#endif
    return host_ids_int32(s, ids, name);
}

/* ---- gemm.c / gemm.cu ------------------------------------------------------------------ */

static PyObject *op_linear(PyObject *args, PyObject *kw, int dev) {
    char *kws[] = {"x", "weight", "bias", dev ? "math" : NULL, NULL};  /* math=: GPU only */
    PyObject *ox, *ow, *ob = Py_None, *om = Py_None, *res = NULL;
    Sig s;
    sig_init(&s, "linear", dev);
    if (!PyArg_ParseTupleAndKeywords(args, kw, dev ? "OO|O$O" : "OO|O", kws, &ox, &ow, &ob, &om))
        return NULL;
    if (dev) CUDA_DO(parse_math(s.fn, om, &s.math));
    PyObject *x, *w, *b, *y;
    NEED(x = arg_in(&s, ox, "x", NPY_FLOAT32, "...K", 0));
    NEED(w = arg_in(&s, ow, "weight", DT_WEIGHT, "NK", 0));
    OPT(b = arg_in(&s, ob, "bias", NPY_FLOAT32, "N", ARG_OPTIONAL));
    if (check_blas_dims(&s, s.dim['T'], s.dim['N'], s.dim['K']) < 0) goto fail;
    NEED(y = arg_new_like(&s, x, s.dim['N'], NPY_FLOAT32));
    if (dev) CUDA_DO(dev_linear(&s, x, w, b, y));
    else CALL(bm_linear(F32(x), DATA(w), WDT(w), F32(b), F32(y), s.dim['T'], s.dim['N'],
                        s.dim['K']));
    res = ret(&s, y);
fail:
    sig_free(&s);
    return res;
}
BINDINGS(linear)

/* bf16 bits (uint16) <-> float32, elementwise: from/to are NPY_UINT16 and NPY_FLOAT32. */
static PyObject *op_convert(PyObject *arg, const char *fn, int from, int to, int dev) {
    PyObject *a, *o, *res = NULL;
    Sig s;
    sig_init(&s, fn, dev);
    NEED(a = arg_get(&s, arg, "a", 0));
    /* On the host this looks at a NumPy argument only: a scalar, converted to a 0-d array,
     * fails the dtype or the shape check below instead (as it always has). */
    if (arg_ndim(a) == 0 && (dev || a == arg)) {
        PyErr_Format(PyExc_ValueError, "%s: a must have at least one dimension", fn);
        goto fail;
    }
    NEED(a = arg_check(&s, a, "a", from, "...n", 0));
    NEED(o = arg_new_like(&s, a, s.dim['n'], to));
    const npy_intp n = arg_size(a);
    if (dev && from == NPY_UINT16) CUDA_CALL(bm_cuda_bf16_to_f32(U16(a), F32(o), n, BM_STREAM));
    else if (dev) CUDA_CALL(bm_cuda_f32_to_bf16(F32(a), U16(o), n, BM_STREAM));
    else {
        Py_BEGIN_ALLOW_THREADS
        if (from == NPY_UINT16) bm_bf16_to_f32(U16(a), F32(o), n);
        else bm_f32_to_bf16(F32(a), U16(o), n);
        Py_END_ALLOW_THREADS
    }
    res = ret(&s, o);
fail:
    sig_free(&s);
    return res;
}

static PyObject *py_bf16_to_f32(PyObject *self, PyObject *a) {
    return op_convert(a, "bf16_to_f32", NPY_UINT16, NPY_FLOAT32, 0);
}

static PyObject *py_f32_to_bf16(PyObject *self, PyObject *a) {
    return op_convert(a, "f32_to_bf16", NPY_FLOAT32, NPY_UINT16, 0);
}

#ifdef BM_WITH_CUDA
static PyObject *py_cuda_bf16_to_f32(PyObject *self, PyObject *a) {
    return op_convert(a, "bf16_to_f32", NPY_UINT16, NPY_FLOAT32, 1);
}

static PyObject *py_cuda_f32_to_bf16(PyObject *self, PyObject *a) {
    return op_convert(a, "f32_to_bf16", NPY_FLOAT32, NPY_UINT16, 1);
}
#endif

/* ---- scan.c / scan.cu ------------------------------------------------------------------ */

static int check_gpu_state_n(Sig *s) {  /* the GPU scan kernels keep 1..64 states per channel */
    if (s->dim['N'] < 1 || s->dim['N'] > 64) {
        PyErr_Format(PyExc_ValueError, "%s: the GPU kernel needs a state size N in 1..64, got %ld",
                     s->fn, (long)s->dim['N']);
        return -1;
    }
    return 0;
}

static PyObject *op_selective_scan(PyObject *args, PyObject *kw, int dev) {
    static char *kws[] = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                          "delta_softplus", "state", NULL};
    PyObject *ou, *odt, *oA, *oB, *oC, *oD = Py_None, *oz = Py_None, *odb = Py_None,
             *ost = Py_None, *res = NULL;
    int softplus = 1;
    Sig s;
    sig_init(&s, "selective_scan", dev);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO|OOOpO", kws, &ou, &odt, &oA, &oB, &oC,
                                     &oD, &oz, &odb, &softplus, &ost))
        return NULL;
    PyObject *u, *dt, *A, *B, *C, *D, *z, *db, *st, *y, *fin;
    /* On the GPU u, delta, z (and so y) may be float32, float16 or bf16 bits, all one dtype;
     * the rest is float32 (bm_cuda_scan_forward_act). */
    NEED(u = arg_in(&s, ou, "u", dev ? DT_ACT : NPY_FLOAT32, "bLE", 0));
    const int at = arg_type(u);
    NEED(dt = arg_in(&s, odt, "delta", at, "bLE", 0));
    NEED(A = arg_in(&s, oA, "A", NPY_FLOAT32, "EN", 0));
    NEED(B = arg_in(&s, oB, "B", NPY_FLOAT32, "bLN", 0));
    NEED(C = arg_in(&s, oC, "C", NPY_FLOAT32, "bLN", 0));
    OPT(D = arg_in(&s, oD, "D", NPY_FLOAT32, "E", ARG_OPTIONAL));
    OPT(z = arg_in(&s, oz, "z", at, "bLE", ARG_OPTIONAL));
    OPT(db = arg_in(&s, odb, "delta_bias", NPY_FLOAT32, "E", ARG_OPTIONAL));
    OPT(st = arg_in(&s, ost, "state", NPY_FLOAT32, "bEN", ARG_OPTIONAL));
    if (dev && check_gpu_state_n(&s) < 0) goto fail;
    NEED(y = arg_new(&s, "bLE", at));
    NEED(fin = arg_new(&s, "bEN", NPY_FLOAT32));
    if (dev)
        CUDA_CALL(bm_cuda_scan_forward_act(DATA(u), DATA(dt), F32(A), F32(B), F32(C), F32(D),
                                           DATA(z), F32(db), softplus, F32(st), F32(fin),
                                           DATA(y), at == NPY_UINT16 ? 1 : at == NPY_FLOAT16 ? 2 : 0,
                                           s.dim['b'], s.dim['L'], s.dim['E'], s.dim['N'],
                                           BM_STREAM));
    else
        CALL(bm_scan_forward(F32(u), F32(dt), F32(A), F32(B), F32(C), F32(D), F32(z), F32(db),
                             softplus, F32(st), F32(fin), F32(y), s.dim['b'], s.dim['L'],
                             s.dim['E'], s.dim['N']));
    res = Py_BuildValue("OO", y, fin);
fail:
    sig_free(&s);
    return res;
}
BINDINGS(selective_scan)

static PyObject *op_selective_state_update(PyObject *args, PyObject *kw, int dev) {
    static char *kws[] = {"state", "x", "delta", "A", "B", "C", "D", "z", "delta_bias",
                          "delta_softplus", NULL};
    PyObject *ost, *ox, *odt, *oA, *oB, *oC, *oD = Py_None, *oz = Py_None, *odb = Py_None,
             *res = NULL;
    int softplus = 1;
    Sig s;
    sig_init(&s, "selective_state_update", dev);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOO|OOOp", kws, &ost, &ox, &odt, &oA, &oB,
                                     &oC, &oD, &oz, &odb, &softplus))
        return NULL;
    PyObject *st, *x, *dt, *A, *B, *C, *D, *z, *db, *y;
    NEED(st = arg_in(&s, ost, "state", NPY_FLOAT32, "bEN", ARG_INPLACE));
    NEED(x = arg_in(&s, ox, "x", NPY_FLOAT32, "bE", 0));
    NEED(dt = arg_in(&s, odt, "delta", NPY_FLOAT32, "bE", 0));
    NEED(A = arg_in(&s, oA, "A", NPY_FLOAT32, "EN", 0));
    NEED(B = arg_in(&s, oB, "B", NPY_FLOAT32, "bN", 0));
    NEED(C = arg_in(&s, oC, "C", NPY_FLOAT32, "bN", 0));
    OPT(D = arg_in(&s, oD, "D", NPY_FLOAT32, "E", ARG_OPTIONAL));
    OPT(z = arg_in(&s, oz, "z", NPY_FLOAT32, "bE", ARG_OPTIONAL));
    OPT(db = arg_in(&s, odb, "delta_bias", NPY_FLOAT32, "E", ARG_OPTIONAL));
    if (dev && check_gpu_state_n(&s) < 0) goto fail;
    NEED(y = arg_new(&s, "bE", NPY_FLOAT32));
    if (dev)
        CUDA_CALL(bm_cuda_scan_step(F32(st), F32(x), F32(dt), F32(A), F32(B), F32(C), F32(D),
                                    F32(z), F32(db), softplus, F32(y), s.dim['b'], s.dim['E'],
                                    s.dim['N'], BM_STREAM));
    else
        CALL(bm_scan_step(F32(st), F32(x), F32(dt), F32(A), F32(B), F32(C), F32(D), F32(z),
                          F32(db), softplus, F32(y), s.dim['b'], s.dim['E'], s.dim['N']));
    res = ret(&s, y);
fail:
    sig_free(&s);
    return res;
}
BINDINGS(selective_state_update)

/* ---- conv.c / conv.cu ------------------------------------------------------------------ */

static int parse_silu(Sig *s, PyObject *o, int *silu) {
    if (o == Py_None) { *silu = 0; return 0; }
    if (PyUnicode_Check(o)) {
        const char *u = PyUnicode_AsUTF8(o);
        if (u == NULL) return -1; /* not encodable: its UnicodeEncodeError propagates */
        if (!strcmp(u, "silu")) { *silu = 1; return 0; }
    }
    PyErr_Format(PyExc_ValueError, "%s: activation must be 'silu' or None, got %R", s->fn, o);
    return -1;
}

/* weight (E, K) or (E, 1, K) with K in 2..8; binds k = K - 1 (the conv state's length). */
static PyObject *conv_weight(Sig *s, PyObject *ow) {
    PyObject *w = arg_get(s, ow, "weight", 0);
    if (!w) return NULL;
    /* on the host only a NumPy argument may be (E, 1, K): a nested list is checked as (E, K) */
    const int w3 = arg_ndim(w) == 3 && (s->dev || w == ow);
    if (!(w = arg_check(s, w, "weight", NPY_FLOAT32, w3 ? "EoK" : "EK", 0))) return NULL;
    if (arg_ndim(w) == 3 && s->dim['o'] != 1) {
        PyErr_Format(PyExc_ValueError, "%s: weight must have shape (E, K) or (E, 1, K)", s->fn);
        return NULL;
    }
    if (s->dim['K'] < 2 || s->dim['K'] > 8) {
        PyErr_Format(PyExc_ValueError, "%s: conv width K must be in 2..8, got %ld", s->fn,
                     (long)s->dim['K']);
        return NULL;
    }
    s->dim['k'] = s->dim['K'] - 1;
    return w;
}

static PyObject *op_causal_conv1d(PyObject *args, PyObject *kw, int dev) {
    static char *kws[] = {"x", "weight", "bias", "conv_state", "activation", NULL};
    PyObject *ox, *ow, *ob = Py_None, *ocs = Py_None, *oact = NULL, *res = NULL;
    Sig s;
    sig_init(&s, "causal_conv1d", dev);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOO", kws, &ox, &ow, &ob, &ocs, &oact))
        return NULL;
    int silu = 1;
    if (oact && parse_silu(&s, oact, &silu) < 0) return NULL;
    PyObject *x, *w, *b, *cs, *y, *fin;
    NEED(x = arg_in(&s, ox, "x", NPY_FLOAT32, "bLE", 0));
    NEED(w = conv_weight(&s, ow));
    OPT(b = arg_in(&s, ob, "bias", NPY_FLOAT32, "E", ARG_OPTIONAL));
    OPT(cs = arg_in(&s, ocs, "conv_state", NPY_FLOAT32, "bkE", ARG_OPTIONAL));
    NEED(y = arg_new(&s, "bLE", NPY_FLOAT32));
    NEED(fin = arg_new(&s, "bkE", NPY_FLOAT32));
    if (dev)
        CUDA_CALL(bm_cuda_conv_forward(F32(x), F32(w), F32(b), F32(cs), F32(fin), F32(y), silu,
                                       s.dim['b'], s.dim['L'], s.dim['E'], s.dim['K'], BM_STREAM));
    else
        CALL(bm_conv_forward(F32(x), F32(w), F32(b), F32(cs), F32(fin), F32(y), silu, s.dim['b'],
                             s.dim['L'], s.dim['E'], s.dim['K']));
    res = Py_BuildValue("OO", y, fin);
fail:
    sig_free(&s);
    return res;
}
BINDINGS(causal_conv1d)

static PyObject *op_causal_conv1d_update(PyObject *args, PyObject *kw, int dev) {
    static char *kws[] = {"x", "conv_state", "weight", "bias", "activation", NULL};
    PyObject *ox, *ocs, *ow, *ob = Py_None, *oact = NULL, *res = NULL;
    Sig s;
    sig_init(&s, "causal_conv1d_update", dev);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|OO", kws, &ox, &ocs, &ow, &ob, &oact))
        return NULL;
    int silu = 1;
    if (oact && parse_silu(&s, oact, &silu) < 0) return NULL;
    PyObject *x, *w, *b, *cs, *y;
    NEED(x = arg_in(&s, ox, "x", NPY_FLOAT32, "bE", 0));
    NEED(w = conv_weight(&s, ow));
    NEED(cs = arg_in(&s, ocs, "conv_state", NPY_FLOAT32, "bkE", ARG_INPLACE));
    OPT(b = arg_in(&s, ob, "bias", NPY_FLOAT32, "E", ARG_OPTIONAL));
    NEED(y = arg_new(&s, "bE", NPY_FLOAT32));
    if (dev)
        CUDA_CALL(bm_cuda_conv_step(F32(x), F32(cs), F32(w), F32(b), F32(y), silu, s.dim['b'],
                                    s.dim['E'], s.dim['K'], BM_STREAM));
    else
        CALL(bm_conv_step(F32(x), F32(cs), F32(w), F32(b), F32(y), silu, s.dim['b'], s.dim['E'],
                          s.dim['K']));
    res = ret(&s, y);
fail:
    sig_free(&s);
    return res;
}
BINDINGS(causal_conv1d_update)

/* ---- norm.c / norm.cu ------------------------------------------------------------------ */

static int parse_eps(Sig *s, double eps) {
    if (!(eps >= 0.0) || eps > 1.0) {
        /* PyErr_Format has no %g: format the value through a float object */
        PyObject *v = PyFloat_FromDouble(eps);
        if (v) PyErr_Format(PyExc_ValueError, "%s: eps must be in [0, 1], got %R", s->fn, v);
        Py_XDECREF(v);
        return -1;
    }
    return 0;
}

/* "...d" alone lets (3, 2, d) stand for (2, 3, d): the residual must match x exactly. */
static int check_residual(Sig *s, PyObject *x, PyObject *r) {
    const int nd = arg_ndim(x);
    if (!r || (arg_ndim(r) == nd &&
               !memcmp(arg_dims(r), arg_dims(x), sizeof(npy_intp) * (size_t)nd)))
        return 0;
    char got[256], want[256];
    shape_str(got, sizeof(got), arg_ndim(r), arg_dims(r));
    shape_str(want, sizeof(want), nd, arg_dims(x));
    PyErr_Format(PyExc_ValueError, "%s: residual must have the shape of x %s, got %s", s->fn,
                 want, got);
    return -1;
}

static int check_gpu_norm_d(Sig *s) {  /* the GPU norm kernels keep a row in shared memory */
    if (s->dim['d'] > 50000) {
        PyErr_Format(PyExc_ValueError, "%s: the GPU kernel needs d <= 50000, got %ld", s->fn,
                     (long)s->dim['d']);
        return -1;
    }
    return 0;
}

static PyObject *op_rms_norm(PyObject *args, PyObject *kw, int dev) {
    static char *kws[] = {"x", "weight", "residual", "eps", NULL};
    PyObject *ox, *ow, *or = Py_None, *res = NULL;
    double eps = 1e-5;
    Sig s;
    sig_init(&s, "rms_norm", dev);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|Od", kws, &ox, &ow, &or, &eps)) return NULL;
    if (parse_eps(&s, eps) < 0) return NULL;
    PyObject *x, *w, *r, *out, *rout;
    NEED(x = arg_in(&s, ox, "x", NPY_FLOAT32, "...d", 0));
    NEED(w = arg_in(&s, ow, "weight", NPY_FLOAT32, "d", 0));
    OPT(r = arg_in(&s, or, "residual", NPY_FLOAT32, "...d", ARG_OPTIONAL));
    if (check_residual(&s, x, r) < 0) goto fail;
    if (dev && check_gpu_norm_d(&s) < 0) goto fail;
    NEED(out = arg_new_like(&s, x, s.dim['d'], NPY_FLOAT32));
    NEED(rout = arg_new_like(&s, x, s.dim['d'], NPY_FLOAT32));
    if (dev)
        CUDA_CALL(bm_cuda_rms_norm(F32(x), F32(r), F32(w), (float)eps, F32(out), F32(rout),
                                   s.dim['T'], s.dim['d'], BM_STREAM));
    else
        CALL(bm_rms_norm(F32(x), F32(r), F32(w), (float)eps, F32(out), F32(rout), s.dim['T'],
                         s.dim['d']));
    res = Py_BuildValue("OO", out, rout);
fail:
    sig_free(&s);
    return res;
}
BINDINGS(rms_norm)

static PyObject *op_layer_norm(PyObject *args, PyObject *kw, int dev) {
    static char *kws[] = {"x", "weight", "bias", "residual", "eps", NULL};
    PyObject *ox, *ow, *ob = Py_None, *or = Py_None, *res = NULL;
    double eps = 1e-5;
    Sig s;
    sig_init(&s, "layer_norm", dev);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOd", kws, &ox, &ow, &ob, &or, &eps))
        return NULL;
    if (parse_eps(&s, eps) < 0) return NULL;
    PyObject *x, *w, *b, *r, *out;
    NEED(x = arg_in(&s, ox, "x", NPY_FLOAT32, "...d", 0));
    NEED(w = arg_in(&s, ow, "weight", NPY_FLOAT32, "d", 0));
    OPT(b = arg_in(&s, ob, "bias", NPY_FLOAT32, "d", ARG_OPTIONAL));
    OPT(r = arg_in(&s, or, "residual", NPY_FLOAT32, "...d", ARG_OPTIONAL));
    if (check_residual(&s, x, r) < 0) goto fail;
    if (dev && check_gpu_norm_d(&s) < 0) goto fail;
    NEED(out = arg_new_like(&s, x, s.dim['d'], NPY_FLOAT32));
    if (dev)
        CUDA_CALL(bm_cuda_layer_norm(F32(x), F32(r), F32(w), F32(b), (float)eps, F32(out),
                                     s.dim['T'], s.dim['d'], BM_STREAM));
    else
        CALL(bm_layer_norm(F32(x), F32(r), F32(w), F32(b), (float)eps, F32(out), s.dim['T'],
                           s.dim['d']));
    res = ret(&s, out);
fail:
    sig_free(&s);
    return res;
}
BINDINGS(layer_norm)

/* ---- moe.c / moe.cu -------------------------------------------------------------------- */

#define GPU_MAX_EXPERTS 256  /* the GPU routing, dispatch and expert kernels (moe.cu) */

static int check_gpu_experts(Sig *s) {
    if (s->dim['X'] < 1) {
        PyErr_Format(PyExc_ValueError, "%s: need at least one expert", s->fn);
        return -1;
    }
    if (s->dim['X'] > GPU_MAX_EXPERTS) {
        PyErr_Format(PyExc_ValueError, "%s: the GPU kernels take at most %d experts, got %ld",
                     s->fn, GPU_MAX_EXPERTS, (long)s->dim['X']);
        return -1;
    }
    return 0;
}

static PyObject *op_route_top1(PyObject *args, PyObject *kw, int dev) {
    static char *kws[] = {"x", "router_weight", "router_bias", "return_logits", NULL};
    PyObject *ox, *ow, *ob, *res = NULL;
    int want_logits = 0;
    Sig s;
    sig_init(&s, "route_top1", dev);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|p", kws, &ox, &ow, &ob, &want_logits))
        return NULL;
    PyObject *x, *w, *b, *ids, *gates, *logits = NULL;
    NEED(x = arg_in(&s, ox, "x", NPY_FLOAT32, "...d", 0));
    /* bf16 router weights: the GPU kernel only */
    NEED(w = arg_in(&s, ow, "router_weight", dev ? DT_WEIGHT : NPY_FLOAT32, "Xd", 0));
    NEED(b = arg_in(&s, ob, "router_bias", NPY_FLOAT32, "X", 0));
    if (s.dim['X'] < 1) {
        PyErr_SetString(PyExc_ValueError, "route_top1: need at least one expert");
        goto fail;
    }
    if (dev && check_gpu_experts(&s) < 0) goto fail;
    NEED(ids = arg_new(&s, "T", NPY_INT32));
    NEED(gates = arg_new(&s, "T", NPY_FLOAT32));
    /* the CPU kernel writes the logits always, the GPU one only when asked */
    if (want_logits || !dev) NEED(logits = arg_new(&s, "TX", NPY_FLOAT32));
    if (dev)
        CUDA_CALL(bm_cuda_route_top1(F32(x), DATA(w), WDT(w), F32(b), F32(logits), I32(ids),
                                     F32(gates), s.dim['T'], s.dim['d'], s.dim['X'], BM_STREAM));
    else
        CALL(bm_route_top1(F32(x), F32(w), F32(b), F32(logits), I32(ids), F32(gates), s.dim['T'],
                           s.dim['d'], s.dim['X']));
    res = want_logits ? Py_BuildValue("OOO", ids, gates, logits) : Py_BuildValue("OO", ids, gates);
fail:
    sig_free(&s);
    return res;
}
BINDINGS(route_top1)

static PyObject *op_moe_dispatch(PyObject *args, PyObject *kw, int dev) {
    static char *kws[] = {"ids", "num_experts", NULL};
    PyObject *oids, *res = NULL;
    Py_ssize_t X;
    Sig s;
    sig_init(&s, "moe_dispatch", dev);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "On", kws, &oids, &X)) return NULL;
    if (!dev && (X < 1 || X > 1 << 20))
        return PyErr_Format(PyExc_ValueError, "moe_dispatch: num_experts must be in 1..2**20");
    if (dev && (X < 1 || X > GPU_MAX_EXPERTS))
        return PyErr_Format(PyExc_ValueError, "moe_dispatch: num_experts must be in 1..%d on the "
                            "GPU, got %zd", GPU_MAX_EXPERTS, X);
    PyObject *ids, *ids32, *counts, *offsets, *perm;
    NEED(ids = arg_in(&s, oids, "ids", DT_INT, "T", 0));
    s.dim['X'] = X;
    NEED(ids32 = ids_int32(&s, ids, "ids"));
    NEED(counts = arg_new(&s, "X", NPY_INT64));
    NEED(offsets = arg_new(&s, "X+", NPY_INT64));
    NEED(perm = arg_new(&s, "T", NPY_INT64));
    if (dev) CUDA_DO(dev_moe_dispatch(&s, ids32, counts, offsets, perm));
    else CALL(bm_moe_dispatch(I32(ids32), s.dim['T'], X, I64(counts), I64(offsets), I64(perm)));
    res = Py_BuildValue("OOO", counts, offsets, perm);
fail:
    sig_free(&s);
    return res;
}
BINDINGS(moe_dispatch)

/* fc1 (X, 2F, d) and fc2 (X, d, F) of one dtype; binds X, F (from 2F) and checks d. */
static int expert_weights(Sig *s, PyObject *o1, PyObject *o2, PyObject **fc1, PyObject **fc2) {
    if (!(*fc1 = arg_in(s, o1, "fc1", DT_WEIGHT, "XGd", 0))) return -1;
    if (s->dim['G'] % 2) {
        PyErr_Format(PyExc_ValueError, "%s: fc1 must have shape (X, 2F, d): its middle "
                     "dimension %ld is odd", s->fn, (long)s->dim['G']);
        return -1;
    }
    s->dim['F'] = s->dim['G'] / 2;
    if (!(*fc2 = arg_in(s, o2, "fc2", DT_WEIGHT, "XdF", 0))) return -1;
    if (arg_type(*fc1) != arg_type(*fc2)) {
        PyErr_Format(PyExc_TypeError, "%s: fc1 and fc2 must have the same dtype", s->fn);
        return -1;
    }
    if (s->dev && check_gpu_experts(s) < 0) return -1;
    return check_blas_dims(s, s->dim['T'], s->dim['G'], s->dim['d']);
}

static PyObject *op_moe_experts(PyObject *args, PyObject *kw, int dev) {
    char *kws[] = {"x", "ids", "gates", "fc1", "fc2", "activation", dev ? "math" : NULL, NULL};
    PyObject *ox, *oids, *og, *o1, *o2, *oact = NULL, *om = Py_None, *res = NULL;
    Sig s;
    sig_init(&s, "moe_experts", dev);
    if (!PyArg_ParseTupleAndKeywords(args, kw, dev ? "OOOOO|O$O" : "OOOOO|O", kws, &ox, &oids,
                                     &og, &o1, &o2, &oact, &om))
        return NULL;
    bm_act act = BM_ACT_GELU;
    if (oact && parse_act(s.fn, oact, &act, 0) < 0) return NULL;
    if (dev) CUDA_DO(parse_math(s.fn, om, &s.math));
    PyObject *x, *ids, *ids32, *g, *fc1, *fc2, *out;
    NEED(x = arg_in(&s, ox, "x", NPY_FLOAT32, "...d", 0));
    NEED(ids = arg_in(&s, oids, "ids", DT_INT, "T", 0));
    OPT(g = arg_in(&s, og, "gates", NPY_FLOAT32, "T", ARG_OPTIONAL));
    if (expert_weights(&s, o1, o2, &fc1, &fc2) < 0) goto fail;
    NEED(ids32 = ids_int32(&s, ids, "ids"));
    NEED(out = arg_new_like(&s, x, s.dim['d'], NPY_FLOAT32));
    if (dev) CUDA_DO(dev_experts(&s, x, ids32, g, fc1, fc2, act, out));
    else CALL(bm_moe_experts(F32(x), I32(ids32), F32(g), DATA(fc1), DATA(fc2), WDT(fc1), act,
                             F32(out), s.dim['T'], s.dim['d'], s.dim['X'], s.dim['F']));
    res = ret(&s, out);
fail:
    sig_free(&s);
    return res;
}
BINDINGS(moe_experts)

static PyObject *op_moe(PyObject *args, PyObject *kw, int dev) {
    char *kws[] = {"x", "router_weight", "router_bias", "fc1", "fc2", "activation",
                   "return_routing", dev ? "math" : NULL, NULL};
    PyObject *ox, *ow, *ob, *o1, *o2, *oact = NULL, *om = Py_None, *res = NULL;
    int routing = 0;
    Sig s;
    sig_init(&s, "moe", dev);
    if (!PyArg_ParseTupleAndKeywords(args, kw, dev ? "OOOOO|Op$O" : "OOOOO|Op", kws, &ox, &ow,
                                     &ob, &o1, &o2, &oact, &routing, &om))
        return NULL;
    bm_act act = BM_ACT_GELU;
    if (oact && parse_act(s.fn, oact, &act, 0) < 0) return NULL;
    if (dev) CUDA_DO(parse_math(s.fn, om, &s.math));
    PyObject *x, *w, *b, *fc1, *fc2, *ids, *gates, *logits, *out;
    NEED(x = arg_in(&s, ox, "x", NPY_FLOAT32, "...d", 0));
    /* bf16 router weights: the GPU kernel only */
    NEED(w = arg_in(&s, ow, "router_weight", dev ? DT_WEIGHT : NPY_FLOAT32, "Xd", 0));
    NEED(b = arg_in(&s, ob, "router_bias", NPY_FLOAT32, "X", 0));
    if (expert_weights(&s, o1, o2, &fc1, &fc2) < 0) goto fail;
    NEED(ids = arg_new(&s, "T", NPY_INT32));
    NEED(gates = arg_new(&s, "T", NPY_FLOAT32));
    NEED(logits = arg_new(&s, "TX", NPY_FLOAT32));
    NEED(out = arg_new_like(&s, x, s.dim['d'], NPY_FLOAT32));
    if (dev)
        CUDA_CALL(bm_cuda_route_top1(F32(x), DATA(w), WDT(w), F32(b), F32(logits), I32(ids),
                                     F32(gates), s.dim['T'], s.dim['d'], s.dim['X'], BM_STREAM));
    else
        CALL(bm_route_top1(F32(x), F32(w), F32(b), F32(logits), I32(ids), F32(gates), s.dim['T'],
                           s.dim['d'], s.dim['X']));
    if (dev) CUDA_DO(dev_experts(&s, x, ids, gates, fc1, fc2, act, out));
    else CALL(bm_moe_experts(F32(x), I32(ids), F32(gates), DATA(fc1), DATA(fc2), WDT(fc1), act,
                             F32(out), s.dim['T'], s.dim['d'], s.dim['X'], s.dim['F']));
    res = routing ? Py_BuildValue("OOOO", out, ids, gates, logits) : ret(&s, out);
fail:
    sig_free(&s);
    return res;
}
BINDINGS(moe)

static PyObject *op_mlp(PyObject *args, PyObject *kw, int dev) {
    char *kws[] = {"x", "fc1", "fc2", "activation", "gated", dev ? "math" : NULL, NULL};
    PyObject *ox, *o1, *o2, *oact = NULL, *om = Py_None, *res = NULL;
    int gated = 1;
    Sig s;
    sig_init(&s, "mlp", dev);
    if (!PyArg_ParseTupleAndKeywords(args, kw, dev ? "OOO|Op$O" : "OOO|Op", kws, &ox, &o1, &o2,
                                     &oact, &gated, &om))
        return NULL;
    bm_act act = BM_ACT_GELU;
    if (oact && parse_act(s.fn, oact, &act, 1) < 0) return NULL;
    if (dev) CUDA_DO(parse_math(s.fn, om, &s.math));
    if (dev && !gated)
        return PyErr_Format(PyExc_ValueError, "mlp: gated=False has no GPU kernel (only the gated "
                            "MLP of BlackMamba's dense layers)");
    PyObject *x, *fc1, *fc2, *out;
    NEED(x = arg_in(&s, ox, "x", NPY_FLOAT32, "...d", 0));
    NEED(fc1 = arg_in(&s, o1, "fc1", DT_WEIGHT, "Gd", 0));
    if (gated && s.dim['G'] % 2) {
        PyErr_Format(PyExc_ValueError, "mlp: gated fc1 must have shape (2F, d), got an odd "
                     "first dimension %ld", (long)s.dim['G']);
        goto fail;
    }
    s.dim['F'] = gated ? s.dim['G'] / 2 : s.dim['G'];
    NEED(fc2 = arg_in(&s, o2, "fc2", DT_WEIGHT, "dF", 0));
    if (arg_type(fc1) != arg_type(fc2)) {
        PyErr_SetString(PyExc_TypeError, "mlp: fc1 and fc2 must have the same dtype");
        goto fail;
    }
    if (check_blas_dims(&s, s.dim['T'], s.dim['G'], s.dim['d']) < 0) goto fail;
    NEED(out = arg_new_like(&s, x, s.dim['d'], NPY_FLOAT32));
    if (dev) CUDA_DO(dev_mlp(&s, x, fc1, fc2, act, out));
    else CALL(bm_mlp(F32(x), DATA(fc1), DATA(fc2), WDT(fc1), act, gated, F32(out), s.dim['T'],
                     s.dim['d'], s.dim['F']));
    res = ret(&s, out);
fail:
    sig_free(&s);
    return res;
}
BINDINGS(mlp)

/* ---- sinkhorn.c / sinkhorn.cu ---------------------------------------------------------- */

static PyObject *op_sinkhorn(PyObject *args, PyObject *kw, int dev) {
    static char *kws[] = {"logits", "tol", "init", "max_iters", NULL};
    PyObject *ol, *res = NULL;
    double tol = 1e-4;
    const char *init = "blackmamba";
    int max_iters = 1000;
    Sig s;
    sig_init(&s, "sinkhorn", dev);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|dsi", kws, &ol, &tol, &init, &max_iters))
        return NULL;
    bm_sinkhorn_init in;
    if (!strcmp(init, "blackmamba")) in = BM_SINKHORN_BLACKMAMBA;
    else if (!strcmp(init, "uniform")) in = BM_SINKHORN_UNIFORM;
    else return PyErr_Format(PyExc_ValueError, "sinkhorn: init must be 'blackmamba' or 'uniform', got '%s'", init);
    if (!(tol >= 0.0)) return PyErr_Format(PyExc_ValueError, "sinkhorn: tol must be >= 0");
    if (max_iters < 1) return PyErr_Format(PyExc_ValueError, "sinkhorn: max_iters must be >= 1");
    PyObject *S, *P;
    NEED(S = arg_in(&s, ol, "logits", NPY_FLOAT32, "TX", 0));
    if (s.dim['T'] < 1 || s.dim['X'] < 1) {
        PyErr_SetString(PyExc_ValueError, "sinkhorn: logits must have at least one row and column");
        goto fail;
    }
    if (dev && s.dim['X'] > 64) {
        PyErr_Format(PyExc_ValueError, "sinkhorn: the GPU kernel takes at most 64 experts "
                     "(columns), got %ld", (long)s.dim['X']);
        goto fail;
    }
    NEED(P = arg_new(&s, "TX", NPY_FLOAT32));
    int iters = 0;
    if (dev) CUDA_DO(dev_sinkhorn(&s, S, P, (float)tol, in, max_iters, &iters));
    else CALL(bm_sinkhorn(F32(S), F32(P), s.dim['T'], s.dim['X'], (float)tol, in, max_iters,
                          &iters));
    res = Py_BuildValue("Oi", P, iters);
fail:
    sig_free(&s);
    return res;
}
BINDINGS(sinkhorn)

/* ---- sample.cu: the next token on the device (GPU only: the twin is generation.py) ------ */
#ifdef BM_WITH_CUDA

/* Sampling settings from Python values (None = off), validated: 0, or -1 with ValueError. */
static int parse_sampling(const char *fn, double temperature, PyObject *ok, PyObject *op,
                          PyObject *oseed, long long step, bm_cuda_sampling *sp) {
    memset(sp, 0, sizeof *sp);
    if (!(temperature >= 0.0) || !(temperature <= 3.0e38)) {   /* finite as a float32 */
        PyErr_Format(PyExc_ValueError, "%s: temperature must be a finite number >= 0, got %g",
                     fn, temperature);
        return -1;
    }
    /* a positive temperature below float32's range stays positive: sampling among the tied
     * maxima (the twin's limit), not greedy's lowest id */
    sp->temperature = temperature > 0.0 && (float)temperature == 0.f ? 1e-45f : (float)temperature;
    if (ok != Py_None) {
        const long long k = PyBool_Check(ok) ? -1 : PyLong_AsLongLong(ok);
        if (k == -1 && PyErr_Occurred()) PyErr_Clear();
        if (k < 1 || !PyLong_Check(ok)) {
            PyErr_Format(PyExc_ValueError, "%s: top_k must be None or an integer >= 1, got %R",
                         fn, ok);
            return -1;
        }
        sp->top_k = k;
    }
    sp->top_p = 1.0;
    if (op != Py_None) {
        const double p = PyBool_Check(op) ? -1.0 : PyFloat_AsDouble(op);
        if (p == -1.0 && PyErr_Occurred()) PyErr_Clear();
        if (!(p > 0.0 && p <= 1.0)) {
            PyErr_Format(PyExc_ValueError, "%s: top_p must be None or a number in (0, 1], got %R",
                         fn, op);
            return -1;
        }
        sp->top_p = p;
    }
    const unsigned long long seed =
        PyLong_Check(oseed) && !PyBool_Check(oseed) ? PyLong_AsUnsignedLongLong(oseed)
                                                    : (unsigned long long)-1;
    if (PyErr_Occurred() || !PyLong_Check(oseed) || PyBool_Check(oseed)) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: seed must be an integer in [0, 2**64), got %R", fn,
                     oseed);
        return -1;
    }
    if (step < 0) {
        PyErr_Format(PyExc_ValueError, "%s: step must be >= 0, got %lld", fn, step);
        return -1;
    }
    sp->seed = seed;
    sp->step = step;
    return 0;
}

/* Rows whose status has an error bit -> FloatingPointError naming the first such row. */
static int sample_status_check(const char *fn, const int32_t *status, int64_t B) {
    for (int64_t b = 0; b < B; b++) {
        if (status[b] & BM_CUDA_SAMPLE_NAN) {
            PyErr_Format(PyExc_FloatingPointError,
                         "%s: row %lld: the logits contain NaN: check the weights/input", fn,
                         (long long)b);
            return -1;
        }
        if (status[b] & BM_CUDA_SAMPLE_NEG_INF) {
            PyErr_Format(PyExc_FloatingPointError,
                         "%s: row %lld: every logit is -inf: no token can be sampled", fn,
                         (long long)b);
            return -1;
        }
    }
    return 0;
}

/* cuda_sample(logits (B, V) float32 on the GPU, temperature=1.0, top_k=None, top_p=None,
 *             seed=0, step=0, vocab_limit=None, row_streams=True, path=0, return_info=False)
 * -> tokens int64 (B,) DeviceArray, or (tokens, status int32 (B,), u float64 (B,)) (host). */
static PyObject *py_cuda_sample(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"logits", "temperature", "top_k", "top_p", "seed", "step",
                          "vocab_limit", "row_streams", "path", "return_info", NULL};
    PyObject *ol, *ok = Py_None, *op = Py_None, *oseed = NULL, *olim = Py_None, *res = NULL;
    double temperature = 1.0;
    long long step = 0;
    int row_streams = 1, path = 0, info = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|dOOOLOpip", kws, &ol, &temperature, &ok, &op,
                                     &oseed, &step, &olim, &row_streams, &path, &info))
        return NULL;
    Sig s;
    sig_init(&s, "sample", 1);
    bm_cuda_sampling sp;
    PyObject *seed0 = NULL;
    if (!oseed) oseed = seed0 = PyLong_FromLong(0);
    if (!oseed || parse_sampling(s.fn, temperature, ok, op, oseed, step, &sp) < 0) goto fail;
    if (path < 0 || path > 7) {
        PyErr_Format(PyExc_ValueError, "sample: path must be 0 (auto), or 1 (force the generic "
                     "path) | 2 (force global-memory reads) | 4 (one block a row at any batch)");
        goto fail;
    }
    sp.row_streams = row_streams;
    sp.path = path;
    DeviceArray *lg;
    NEED(lg = sig_dev_get(&s, ol, "logits", 0));
    if (sig_dev_check(&s, lg, "logits", NPY_FLOAT32, "BV", 0) < 0) goto fail;
    const int64_t B = s.dim['B'], V = s.dim['V'];
    long long limit = V;
    if (olim != Py_None) {
        limit = PyBool_Check(olim) ? -1 : PyLong_AsLongLong(olim);
        if (limit == -1 && PyErr_Occurred()) PyErr_Clear();
    }
    if (limit < 1 || limit > V || limit > INT32_MAX - 1024) {
        PyErr_Format(PyExc_ValueError, "sample: vocab_limit must be None or an integer in [1, "
                     "V=%lld] (V below 2**31), got %R", (long long)V, olim);
        goto fail;
    }
    PyObject *t32, *t64, *st, *u;
    NEED(t32 = arg_new(&s, "B", NPY_INT32));
    NEED(t64 = arg_new(&s, "B", NPY_INT64));
    NEED(st = arg_new(&s, "B", NPY_INT32));
    NEED(u = arg_new(&s, "B", NPY_FLOAT64));
    npy_intp db[1] = {(npy_intp)B};
    PyArrayObject *hst = (PyArrayObject *)sig_own(&s, PyArray_ZEROS(1, db, NPY_INT32, 0));
    PyArrayObject *hu = (PyArrayObject *)sig_own(&s, PyArray_ZEROS(1, db, NPY_FLOAT64, 0));
    if (!hst || !hu) goto fail;
    {
        int rc = 0;
        cudaError_t me = cudaSuccess;
        Py_BEGIN_ALLOW_THREADS
        if (B) me = cudaMemsetAsync(DATA(st), 0, (size_t)B * 4, BM_STREAM);  /* |= below */
        if (me == cudaSuccess)
            rc = bm_cuda_sample((const float *)lg->ptr, B, V, limit, &sp, I32(t32), I32(st),
                                (double *)DATA(u), BM_STREAM);
        if (me == cudaSuccess && !rc) rc = bm_cuda_i32_to_i64(I32(t32), I64(t64), B, BM_STREAM);
        Py_END_ALLOW_THREADS
        if (me != cudaSuccess) {
            (void)cudaGetLastError();
            PyErr_Format(PyExc_RuntimeError, "sample: cudaMemsetAsync: %s: %s",
                         cudaGetErrorName(me), cudaGetErrorString(me));
            goto fail;
        }
        if (cuda_check(&s, rc) < 0) goto fail;
    }
    if (B && (dev_read(&s, PyArray_DATA(hst), DATA(st), (size_t)B * 4) < 0 ||
              dev_read(&s, PyArray_DATA(hu), DATA(u), (size_t)B * 8) < 0))
        goto fail;
    if (sample_status_check(s.fn, (const int32_t *)PyArray_DATA(hst), B) < 0) goto fail;
    res = info ? PyTuple_Pack(3, t64, (PyObject *)hst, (PyObject *)hu) : ret(&s, t64);
fail:
    Py_XDECREF(seed0);
    sig_free(&s);
    return res;
}
#endif /* BM_WITH_CUDA: sample */

/* ---- the cuda_* module functions: devices, memory, arrays and the ops' GPU bindings ---- */
#ifdef BM_WITH_CUDA
#define CKW(name, doc) {"cuda_" #name, (PyCFunction)(void (*)(void))py_cuda_##name, METH_VARARGS | METH_KEYWORDS, doc}

static PyMethodDef cuda_methods[] = {
    {"cuda_probe", py_cuda_probe, METH_NOARGS,
     "cuda_probe() -> {device_count, error (cudaGetDeviceCount's error name or None), "
     "driver_version, runtime_version}; never raises"},
    {"cuda_synchronize", py_cuda_synchronize, METH_NOARGS, "cuda_synchronize(): wait for the device"},
    {"cuda_mem_info", py_cuda_mem_info, METH_NOARGS, "cuda_mem_info() -> (free bytes, total bytes)"},
    {"cuda_allocator", py_cuda_allocator, METH_VARARGS,
     "cuda_allocator(mode=None) -> 'async' (cudaMallocAsync) or 'sync' (cudaMalloc); sets it if given"},
    {"cuda_empty", (PyCFunction)(void (*)(void))py_cuda_empty, METH_VARARGS | METH_KEYWORDS,
     "cuda_empty(shape, dtype='float32') -> uninitialised DeviceArray"},
    {"to_device", (PyCFunction)(void (*)(void))py_to_device, METH_VARARGS | METH_KEYWORDS,
     "to_device(a, dtype=None) -> DeviceArray (host arrays copied; GPU arrays wrapped, no copy)"},
    {"cuda_is_device", py_cuda_is_device, METH_O,
     "cuda_is_device(a) -> True for a GPU array (DeviceArray, CAI, DLPack on CUDA)"},
    {"cuda_asarray", py_cuda_asarray, METH_O,
     "cuda_asarray(a) -> DeviceArray view of a CUDA array (CAI or DLPack), no copy"},
    CKW(linear, "GPU linear(x, weight, bias=None, *, math='fp32'|'tf32'|'bf16'|'bf16x2') -> (..., N)"),
    {"cuda_bf16_to_f32", py_cuda_bf16_to_f32, METH_O, "GPU bf16_to_f32(a uint16) -> float32"},
    {"cuda_f32_to_bf16", py_cuda_f32_to_bf16, METH_O, "GPU f32_to_bf16(a float32) -> uint16"},
    CKW(selective_scan, "GPU selective_scan(...) -> (y (b,L,E), final_state (b,E,N)); N <= 64; "
                        "u, delta, z and y float32, float16 or uint16 (bfloat16 bits), one dtype"),
    CKW(selective_state_update, "GPU selective_state_update(state, ...) -> y; state updated in place"),
    CKW(causal_conv1d, "GPU causal_conv1d(x, weight, bias=None, conv_state=None, activation='silu') "
                       "-> (y, final_conv_state)"),
    CKW(causal_conv1d_update, "GPU causal_conv1d_update(x, conv_state, weight, bias=None, "
                              "activation='silu') -> y; conv_state updated in place"),
    CKW(rms_norm, "GPU rms_norm(x, weight, residual=None, eps=1e-5) -> (out, x + residual)"),
    CKW(layer_norm, "GPU layer_norm(x, weight, bias=None, residual=None, eps=1e-5) -> out"),
    CKW(route_top1, "GPU route_top1(x, router_weight, router_bias, return_logits=False) -> "
                    "(ids int32, gates[, logits]); X <= 256"),
    CKW(moe_dispatch, "GPU moe_dispatch(ids, num_experts) -> (counts, offsets, perm) int64"),
    CKW(moe_experts, "GPU moe_experts(x, ids, gates, fc1, fc2, activation='gelu', *, math='fp32') -> out"),
    CKW(moe, "GPU moe(x, router_weight, router_bias, fc1, fc2, activation='gelu', "
             "return_routing=False, *, math='fp32')"),
    CKW(mlp, "GPU mlp(x, fc1, fc2, activation='gelu', gated=True, *, math='fp32') -> out (gated only)"),
    CKW(sinkhorn, "GPU sinkhorn(logits (T,X<=64), tol=1e-4, init='blackmamba', max_iters=1000) -> "
                  "(P, iterations)"),
    {"cuda_sample", (PyCFunction)(void (*)(void))py_cuda_sample, METH_VARARGS | METH_KEYWORDS,
     "cuda_sample(logits (B,V) f32 GPU, temperature=1.0, top_k=None, top_p=None, seed=0, step=0, "
     "vocab_limit=None, row_streams=True, path=0, return_info=False) -> tokens int64 (B,) "
     "DeviceArray | (tokens, status (B,), u (B,)); NaN / all -inf rows: FloatingPointError"},
    {NULL, NULL, 0, NULL},
};

/* Adds cuda_methods and DeviceArray to the module (PyInit__C). */
static int cuda_module_init(PyObject *m) {
    if (PyModule_AddFunctions(m, cuda_methods) < 0) return -1;
    if (PyType_Ready(&DeviceArrayType) < 0) return -1;
    Py_INCREF(&DeviceArrayType);
    if (PyModule_AddObject(m, "DeviceArray", (PyObject *)&DeviceArrayType) < 0) {
        Py_DECREF(&DeviceArrayType);
        return -1;
    }
    return 0;
}

#endif /* BM_WITH_CUDA: module functions */

/* ---- CUDA engine (cuda/engine.cu): the whole model on the GPU ---------------------------
 * Used by blackmamba/model_cuda.py. Models and states are capsules; a state remembers the
 * model that made it (a state of another model has other sizes: refused here). Inputs are
 * NumPy arrays on the host; logits come back as NumPy float32 copies. */
#ifdef BM_WITH_CUDA
#include "../cuda/bm_cuda.h"  /* relative: the C build has no -Icuda */

#define ENG_MODEL "blackmamba.cuda_model"
#define ENG_STATE "blackmamba.cuda_state"

typedef struct {
    bm_cuda_model *m;
    uint64_t id;                 /* which model a state belongs to */
    int64_t L, d, E, N, K, V;    /* L = num_layers */
    int *mamba, *experts;        /* (L) */
} EngModel;

typedef struct {
    bm_cuda_state *s;
    uint64_t model_id;
    int64_t B;
} EngState;

static uint64_t eng_next_id = 1;  /* under the GIL */

/* A nonzero engine status -> MemoryError (cudaMalloc failed: the message names the bytes),
 * ValueError (BM_CUDA_ERR_ARG) or RuntimeError, with bm_cuda_last_error()'s text. */
static int eng_check(const char *fn, int st) {
    if (st == 0) return 0;
    PyObject *exc = st == (int)cudaErrorMemoryAllocation ? PyExc_MemoryError
                  : st == BM_CUDA_ERR_ARG                ? PyExc_ValueError
                                                         : PyExc_RuntimeError;
    PyErr_Format(exc, "%s: %s", fn, bm_cuda_last_error());
    return -1;
}

static void eng_model_free(PyObject *cap) {
    EngModel *em = (EngModel *)PyCapsule_GetPointer(cap, ENG_MODEL);
    if (!em) return;
    bm_cuda_model_free(em->m);
    PyMem_Free(em->mamba);
    PyMem_Free(em->experts);
    PyMem_Free(em);
}

static void eng_state_free(PyObject *cap) {
    EngState *es = (EngState *)PyCapsule_GetPointer(cap, ENG_STATE);
    if (!es) return;
    bm_cuda_state_free(es->s);
    PyMem_Free(es);
}

static EngModel *eng_model(PyObject *o) {
    return (EngModel *)PyCapsule_GetPointer(o, ENG_MODEL);  /* sets TypeError/ValueError */
}

static EngState *eng_state(PyObject *o, const EngModel *em) {
    EngState *es = (EngState *)PyCapsule_GetPointer(o, ENG_STATE);
    if (es && es->model_id != em->id) {
        PyErr_SetString(PyExc_ValueError, "the state belongs to another CUDA model");
        return NULL;
    }
    return es;
}

static PyObject *eng_wrap_state(bm_cuda_state *s, const EngModel *em) {
    EngState *es = (EngState *)PyMem_Calloc(1, sizeof(EngState));
    if (!es) {
        bm_cuda_state_free(s);
        return PyErr_NoMemory();
    }
    es->s = s;
    es->model_id = em->id;
    es->B = bm_cuda_state_batch(s);
    PyObject *cap = PyCapsule_New(es, ENG_STATE, eng_state_free);
    if (!cap) {
        bm_cuda_state_free(s);
        PyMem_Free(es);
    }
    return cap;
}

static int64_t eng_int(PyObject *cfg, const char *key, int *err) {
    PyObject *v = PyDict_GetItemString(cfg, key);
    if (!v) {
        if (!*err) PyErr_Format(PyExc_KeyError, "cuda_model_create: config lacks %s", key);
        *err = 1;
        return 0;
    }
    long long x = PyLong_AsLongLong(v);
    if (x == -1 && PyErr_Occurred()) *err = 1;
    return (int64_t)x;
}

static const char *eng_str(PyObject *cfg, const char *key) {
    PyObject *v = PyDict_GetItemString(cfg, key);
    if (!v || !PyUnicode_Check(v)) {
        PyErr_Format(PyExc_KeyError, "cuda_model_create: config key %s must be a string", key);
        return NULL;
    }
    return PyUnicode_AsUTF8(v);
}

/* A host tensor from dict `d`[key]: float32, uint16 (bf16 bits) or float16, `numel` elements, kept
 * alive in `keep` until the upload is done. Absent/None: data NULL (an error if required). */
static int eng_tensor(PyObject *obj, const char *where, const char *key, int64_t numel,
                      int required, PyObject *keep, bm_cuda_host_tensor *t) {
    t->data = NULL;
    t->dtype = BM_F32;
    if (obj == NULL || obj == Py_None) {
        if (!required) return 0;
        PyErr_Format(PyExc_ValueError, "cuda_model_create: %s lacks %s", where, key);
        return -1;
    }
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "cuda_model_create: %s %s must be a NumPy array", where, key);
        return -1;
    }
    int tn = PyArray_TYPE((PyArrayObject *)obj);
    if (tn != NPY_FLOAT32 && tn != NPY_UINT16 && tn != NPY_FLOAT16) {
        PyErr_Format(PyExc_TypeError, "cuda_model_create: %s %s must be float32, uint16 "
                     "(bf16 bits) or float16", where, key);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(obj, tn, 0, 0, NPY_ARRAY_IN_ARRAY);
    if (!a) return -1;
    int rc = PyList_Append(keep, (PyObject *)a);
    Py_DECREF(a);  /* the list holds it */
    if (rc < 0) return -1;
    if ((int64_t)PyArray_SIZE(a) != numel) {
        PyErr_Format(PyExc_ValueError, "cuda_model_create: %s %s has %lld elements, expected %lld",
                     where, key, (long long)PyArray_SIZE(a), (long long)numel);
        return -1;
    }
    t->data = PyArray_DATA(a);
    t->dtype = tn == NPY_UINT16 ? BM_BF16 : tn == NPY_FLOAT16 ? BM_F16 : BM_F32;
    return 0;
}

static int eng_tensor_key(PyObject *d, const char *where, const char *key, int64_t numel,
                          int required, PyObject *keep, bm_cuda_host_tensor *t) {
    return eng_tensor(PyDict_GetItemString(d, key), where, key, numel, required, keep, t);
}

/* cuda_model_create(cfg: dict, weights: dict) -> model capsule. See model_cuda.py. */
static PyObject *py_cuda_model_create(PyObject *self, PyObject *args) {
    PyObject *cfgd, *wd, *res = NULL, *keep = NULL;
    if (!PyArg_ParseTuple(args, "O!O!", &PyDict_Type, &cfgd, &PyDict_Type, &wd)) return NULL;
    bm_cuda_config c;
    memset(&c, 0, sizeof c);
    int err = 0;
    c.num_layers = eng_int(cfgd, "num_layers", &err);
    c.d = eng_int(cfgd, "d", &err);
    c.E = eng_int(cfgd, "E", &err);
    c.N = eng_int(cfgd, "N", &err);
    c.K = eng_int(cfgd, "K", &err);
    c.R = eng_int(cfgd, "R", &err);
    c.F = eng_int(cfgd, "F", &err);
    c.V = eng_int(cfgd, "V", &err);
    c.real_vocab = eng_int(cfgd, "real_vocab", &err);
    c.conv_bias = (int)eng_int(cfgd, "conv_bias", &err);
    c.bias = (int)eng_int(cfgd, "bias", &err);
    c.swiglu = (int)eng_int(cfgd, "swiglu", &err);
    if (err) return NULL;
    if (c.num_layers < 1 || c.num_layers > 4096) {
        PyErr_SetString(PyExc_ValueError, "cuda_model_create: num_layers must be in 1..4096");
        return NULL;
    }
    const char *act = eng_str(cfgd, "act"), *wdt = eng_str(cfgd, "wdtype"), *math = eng_str(cfgd, "math");
    if (!act || !wdt || !math) return NULL;
    if (parse_act("cuda_model_create", PyDict_GetItemString(cfgd, "act"), &c.act, 0) < 0) return NULL;
    if (!strcmp(wdt, "float32")) c.wdtype = BM_F32;
    else if (!strcmp(wdt, "bfloat16")) c.wdtype = BM_BF16;
    else if (!strcmp(wdt, "float16")) c.wdtype = BM_F16;
    else return PyErr_Format(PyExc_ValueError, "cuda_model_create: wdtype must be 'float32', "
                             "'bfloat16' or 'float16', got '%s'", wdt);
    if (!strcmp(math, "fp32")) c.math = BM_CUDA_MATH_FP32;
    else if (!strcmp(math, "tf32")) c.math = BM_CUDA_MATH_TF32;
    else if (!strcmp(math, "bf16")) c.math = BM_CUDA_MATH_BF16;
    else if (!strcmp(math, "bf16x2")) c.math = BM_CUDA_MATH_BF16X2;
    else return PyErr_Format(PyExc_ValueError, "cuda_model_create: math must be 'fp32', 'tf32', "
                             "'bf16' or 'bf16x2', got '%s'", math);
    if (PyDict_GetItemString(cfgd, "split_rows")) {  /* optional: 0 default, < 0 never */
        c.bf16_split_rows = eng_int(cfgd, "split_rows", &err);
        if (err) return NULL;
    }

    const int64_t L = c.num_layers, d = c.d, E = c.E, N = c.N, K = c.K, R = c.R, F = c.F;
    const int64_t G = c.swiglu ? 2 * F : F;
    EngModel *em = (EngModel *)PyMem_Calloc(1, sizeof(EngModel));
    bm_cuda_layer_weights *lw = (bm_cuda_layer_weights *)PyMem_Calloc((size_t)L, sizeof *lw);
    bm_cuda_host_tensor **fcs = (bm_cuda_host_tensor **)PyMem_Calloc((size_t)L, sizeof *fcs);
    if (!em || !lw || !fcs) {
        PyErr_NoMemory();
        goto fail;
    }
    em->mamba = (int *)PyMem_Calloc((size_t)L, sizeof(int));
    em->experts = (int *)PyMem_Calloc((size_t)L, sizeof(int));
    if (!em->mamba || !em->experts || !(keep = PyList_New(0))) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto fail;
    }
    PyObject *mam = PyDict_GetItemString(cfgd, "mamba"), *exl = PyDict_GetItemString(cfgd, "experts");
    PyObject *layers = PyDict_GetItemString(wd, "layers");
    if (!mam || !exl || !PyList_Check(mam) || !PyList_Check(exl) || PyList_GET_SIZE(mam) != L ||
        PyList_GET_SIZE(exl) != L || !layers || !PyList_Check(layers) ||
        PyList_GET_SIZE(layers) != L) {
        PyErr_SetString(PyExc_ValueError, "cuda_model_create: config mamba/experts and weights "
                        "layers must be lists of num_layers entries");
        goto fail;
    }
    for (int64_t i = 0; i < L; i++) {
        long mv = PyLong_AsLong(PyList_GET_ITEM(mam, i)), xv = PyLong_AsLong(PyList_GET_ITEM(exl, i));
        if ((mv == -1 || xv == -1) && PyErr_Occurred()) goto fail;
        if (xv < 0 || xv > 256) {
            PyErr_Format(PyExc_ValueError, "cuda_model_create: layer %lld: experts must be in "
                         "0..256", (long long)i);
            goto fail;
        }
        em->mamba[i] = mv != 0;
        em->experts[i] = (int)xv;
    }
    c.mamba = em->mamba;
    c.experts = em->experts;
    if (d < 1 || E < 1 || N < 1 || K < 2 || R < 1 || c.V < 1 || F < 0) {
        PyErr_SetString(PyExc_ValueError, "cuda_model_create: bad dimensions");
        goto fail;
    }

    bm_cuda_weights w;
    memset(&w, 0, sizeof w);
    if (eng_tensor_key(wd, "model", "emb", c.V * d, 1, keep, &w.emb) < 0 ||
        eng_tensor_key(wd, "model", "final_w", d, 1, keep, &w.final_w) < 0 ||
        eng_tensor_key(wd, "model", "final_b", d, 1, keep, &w.final_b) < 0)
        goto fail;
    for (int64_t i = 0; i < L; i++) {
        PyObject *ld = PyList_GET_ITEM(layers, i);
        char where[32];
        snprintf(where, sizeof where, "layer %lld", (long long)i);
        if (!PyDict_Check(ld)) {
            PyErr_Format(PyExc_TypeError, "cuda_model_create: %s must be a dict", where);
            goto fail;
        }
        const int mb = em->mamba[i], X = em->experts[i];
        bm_cuda_layer_weights *l = &lw[i];
#define T_(key, n, req) if (eng_tensor_key(ld, where, #key, (n), (req), keep, &l->key) < 0) goto fail
        T_(norm_w, d, 1);
        T_(norm_moe_w, d, mb && X);
        if (mb) {
            T_(in_w, 2 * E * d, 1);
            T_(in_b, 2 * E, c.bias);
            T_(conv_w, E * K, 1);
            T_(conv_b, E, c.conv_bias);
            T_(x_w, (R + 2 * N) * E, 1);
            T_(dt_w, E * R, 1);
            T_(dt_b, E, 1);
            T_(A, E * N, 1);
            T_(D, E, 1);
            T_(out_w, d * E, 1);
            T_(out_b, d, c.bias);
        }
        if (X >= 2) {
            T_(router_w, X * d, 1);
            T_(router_b, X, 1);
        }
#undef T_
        if (X) {
            PyObject *f1 = PyDict_GetItemString(ld, "fc1"), *f2 = PyDict_GetItemString(ld, "fc2");
            if (!f1 || !f2 || !PyList_Check(f1) || !PyList_Check(f2) || PyList_GET_SIZE(f1) != X ||
                PyList_GET_SIZE(f2) != X) {
                PyErr_Format(PyExc_ValueError, "cuda_model_create: %s fc1/fc2 must be lists of "
                             "%d arrays", where, X);
                goto fail;
            }
            fcs[i] = (bm_cuda_host_tensor *)PyMem_Calloc((size_t)(2 * X), sizeof(bm_cuda_host_tensor));
            if (!fcs[i]) {
                PyErr_NoMemory();
                goto fail;
            }
            for (int e = 0; e < X; e++) {
                if (eng_tensor(PyList_GET_ITEM(f1, e), where, "fc1[e]", G * d, 1, keep, &fcs[i][e]) < 0 ||
                    eng_tensor(PyList_GET_ITEM(f2, e), where, "fc2[e]", d * F, 1, keep, &fcs[i][X + e]) < 0)
                    goto fail;
            }
            l->fc1 = fcs[i];
            l->fc2 = fcs[i] + X;
        }
    }
    w.layers = lw;

    em->L = L; em->d = d; em->E = E; em->N = N; em->K = K; em->V = c.V;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_model_create(&c, &w, &em->m);
    Py_END_ALLOW_THREADS
    if (eng_check("cuda_model_create", st) < 0) goto fail;
    em->id = eng_next_id++;
    res = PyCapsule_New(em, ENG_MODEL, eng_model_free);
    if (!res) {
        bm_cuda_model_free(em->m);
        em->m = NULL;
        goto fail;
    }
    em = NULL;  /* owned by the capsule */
fail:
    if (em) {
        PyMem_Free(em->mamba);
        PyMem_Free(em->experts);
        PyMem_Free(em);
    }
    if (fcs)
        for (int64_t i = 0; i < L; i++) PyMem_Free(fcs[i]);
    PyMem_Free(fcs);
    PyMem_Free(lw);
    Py_XDECREF(keep);
    return res;
}

/* Integer ids of any shape -> new int32 C array object, each in [0, V). */
static PyArrayObject *eng_ids(PyObject *o, int ndim, int64_t V, const char *fn) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(o, NPY_INT64, ndim, ndim, NPY_ARRAY_IN_ARRAY);
    if (!a) return NULL;
    PyArrayObject *out = (PyArrayObject *)PyArray_EMPTY(ndim, PyArray_DIMS(a), NPY_INT32, 0);
    if (!out) {
        Py_DECREF(a);
        return NULL;
    }
    const int64_t *p = (const int64_t *)PyArray_DATA(a);
    int32_t *q = (int32_t *)PyArray_DATA(out);
    for (npy_intp i = 0; i < PyArray_SIZE(a); i++) {
        if (p[i] < 0 || p[i] >= V) {
            PyErr_Format(PyExc_ValueError, "%s: token id %lld is outside [0, %lld)", fn,
                         (long long)p[i], (long long)V);
            Py_DECREF(a);
            Py_DECREF(out);
            return NULL;
        }
        q[i] = (int32_t)p[i];
    }
    Py_DECREF(a);
    return out;
}

/* Host arrays for the routing of T tokens through every MoE layer: a list (per layer) of
 * None or (ids int32 (T,), gates (T,), logits (T, X)); tr's pointer tables point into them. */
static PyObject *eng_trace_new(const EngModel *em, int64_t T, bm_cuda_trace *tr, void **tables) {
    const int64_t L = em->L;
    *tables = PyMem_Calloc((size_t)(3 * L), sizeof(void *));
    PyObject *list = PyList_New(L);
    if (!*tables || !list) {
        Py_XDECREF(list);
        PyMem_Free(*tables);
        *tables = NULL;
        return PyErr_NoMemory();
    }
    tr->logits = (float **)*tables;
    tr->ids = (int32_t **)((void **)*tables + L);
    tr->gates = (float **)((void **)*tables + 2 * L);
    for (int64_t i = 0; i < L; i++) {
        const int X = em->experts[i];
        if (X < 2) {
            Py_INCREF(Py_None);
            PyList_SET_ITEM(list, i, Py_None);
            continue;
        }
        npy_intp dt[1] = {(npy_intp)T}, dl[2] = {(npy_intp)T, X};
        PyObject *ids = PyArray_ZEROS(1, dt, NPY_INT32, 0), *g = PyArray_ZEROS(1, dt, NPY_FLOAT32, 0),
                 *lg = PyArray_ZEROS(2, dl, NPY_FLOAT32, 0);
        PyObject *tup = (ids && g && lg) ? PyTuple_Pack(3, ids, g, lg) : NULL;
        Py_XDECREF(ids);
        Py_XDECREF(g);
        Py_XDECREF(lg);
        if (!tup) {
            Py_DECREF(list);
            PyMem_Free(*tables);
            *tables = NULL;
            return NULL;
        }
        PyList_SET_ITEM(list, i, tup);
        tr->ids[i] = (int32_t *)PyArray_DATA((PyArrayObject *)ids);
        tr->gates[i] = (float *)PyArray_DATA((PyArrayObject *)g);
        tr->logits[i] = (float *)PyArray_DATA((PyArrayObject *)lg);
    }
    return list;
}

/* cuda_model_prefill(model, state, ids (B, L) int, logits 0 none | 1 last | 2 all,
 *                    trace=False) -> (logits (B, L, V) | (B, V) | None, trace list | None) */
static PyObject *py_cuda_model_prefill(PyObject *self, PyObject *args) {
    PyObject *om, *os, *oids, *res = NULL, *logits = Py_None, *trace = Py_None;
    int mode = 0, want_trace = 0;
    if (!PyArg_ParseTuple(args, "OOOi|p", &om, &os, &oids, &mode, &want_trace)) return NULL;
    EngModel *em = eng_model(om);
    EngState *es = em ? eng_state(os, em) : NULL;
    if (!es) return NULL;
    if (mode < 0 || mode > 2) return PyErr_Format(PyExc_ValueError, "cuda_model_prefill: bad logits mode");
    PyArrayObject *ids = eng_ids(oids, 2, em->V, "prefill");
    if (!ids) return NULL;
    const int64_t B = PyArray_DIM(ids, 0), L = PyArray_DIM(ids, 1);
    void *tables = NULL;
    bm_cuda_trace tr;
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    if (B != es->B) {
        PyErr_Format(PyExc_ValueError, "prefill: the state holds %lld rows, ids has %lld",
                     (long long)es->B, (long long)B);
        goto fail;
    }
    if (L < 1) {
        PyErr_SetString(PyExc_ValueError, "prefill: ids has no tokens (L = 0)");
        goto fail;
    }
    if (mode) {
        npy_intp da[3] = {(npy_intp)B, (npy_intp)L, (npy_intp)em->V}, dl[2] = {(npy_intp)B, (npy_intp)em->V};
        Py_DECREF(logits);
        logits = mode == 2 ? PyArray_EMPTY(3, da, NPY_FLOAT32, 0) : PyArray_EMPTY(2, dl, NPY_FLOAT32, 0);
        if (!logits) goto fail;
    }
    if (want_trace) {
        Py_DECREF(trace);
        trace = eng_trace_new(em, B * L, &tr, &tables);
        if (!trace) goto fail;
    }
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_model_prefill(em->m, es->s, (const int32_t *)PyArray_DATA(ids), 0, B, L, mode,
                               mode ? (float *)PyArray_DATA((PyArrayObject *)logits) : NULL, 0,
                               want_trace ? &tr : NULL);
    Py_END_ALLOW_THREADS
    if (eng_check("prefill", st) < 0) goto fail;
    res = PyTuple_Pack(2, logits, trace);
fail:
    Py_DECREF(ids);
    Py_XDECREF(logits);
    Py_XDECREF(trace);
    PyMem_Free(tables);
    return res;
}

/* cuda_model_step(model, state, tokens (B,), graph=True, logits=True, argmax=False,
 *                 trace=False) -> (logits (B, V) | None, argmax int64 (B,) | None, trace | None) */
static PyObject *py_cuda_model_step(PyObject *self, PyObject *args) {
    PyObject *om, *os, *otok, *res = NULL, *logits = Py_None, *amax = Py_None, *trace = Py_None;
    int graph = 1, want_logits = 1, want_amax = 0, want_trace = 0;
    if (!PyArg_ParseTuple(args, "OOO|pppp", &om, &os, &otok, &graph, &want_logits, &want_amax,
                          &want_trace))
        return NULL;
    EngModel *em = eng_model(om);
    EngState *es = em ? eng_state(os, em) : NULL;
    if (!es) return NULL;
    PyArrayObject *tok = eng_ids(otok, 1, em->V, "step");
    if (!tok) return NULL;
    const int64_t B = PyArray_DIM(tok, 0);
    void *tables = NULL;
    bm_cuda_trace tr;
    PyArrayObject *a32 = NULL;
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    if (B != es->B) {
        PyErr_Format(PyExc_ValueError, "step: the state holds %lld rows, tokens has %lld",
                     (long long)es->B, (long long)B);
        goto fail;
    }
    npy_intp dl[2] = {(npy_intp)B, (npy_intp)em->V}, db[1] = {(npy_intp)B};
    if (want_logits) {
        Py_DECREF(logits);
        if (!(logits = PyArray_EMPTY(2, dl, NPY_FLOAT32, 0))) goto fail;
    }
    if (want_amax && !(a32 = (PyArrayObject *)PyArray_EMPTY(1, db, NPY_INT32, 0))) goto fail;
    if (want_trace) {
        Py_DECREF(trace);
        if (!(trace = eng_trace_new(em, B, &tr, &tables))) goto fail;
    }
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_model_step(em->m, es->s, (const int32_t *)PyArray_DATA(tok), 0,
                            want_logits ? (float *)PyArray_DATA((PyArrayObject *)logits) : NULL, 0,
                            a32 ? (int32_t *)PyArray_DATA(a32) : NULL, graph,
                            want_trace ? &tr : NULL);
    Py_END_ALLOW_THREADS
    if (eng_check("step", st) < 0) goto fail;
    if (a32) {
        Py_DECREF(amax);
        if (!(amax = PyArray_Cast(a32, NPY_INT64))) goto fail;
    }
    res = PyTuple_Pack(3, logits, amax, trace);
fail:
    Py_DECREF(tok);
    Py_XDECREF(a32);
    Py_XDECREF(logits);
    Py_XDECREF(amax);
    Py_XDECREF(trace);
    PyMem_Free(tables);
    return res;
}

/* cuda_model_greedy(model, state, tokens (B,), n) -> (B, n) int64 argmaxes (see engine). */
static PyObject *py_cuda_model_greedy(PyObject *self, PyObject *args) {
    PyObject *om, *os, *otok;
    long long n;
    if (!PyArg_ParseTuple(args, "OOOL", &om, &os, &otok, &n)) return NULL;
    EngModel *em = eng_model(om);
    EngState *es = em ? eng_state(os, em) : NULL;
    if (!es) return NULL;
    if (n < 0 || n > (1LL << 30)) return PyErr_Format(PyExc_ValueError, "greedy: n must be in 0..2**30");
    PyArrayObject *tok = eng_ids(otok, 1, em->V, "greedy");
    if (!tok) return NULL;
    const int64_t B = PyArray_DIM(tok, 0);
    PyObject *res = NULL;
    PyArrayObject *o32 = NULL;
    if (B != es->B) {
        PyErr_Format(PyExc_ValueError, "greedy: the state holds %lld rows, tokens has %lld",
                     (long long)es->B, (long long)B);
        goto fail;
    }
    npy_intp dims[2] = {(npy_intp)B, (npy_intp)n};
    if (!(o32 = (PyArrayObject *)PyArray_ZEROS(2, dims, NPY_INT32, 0))) goto fail;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_model_greedy(em->m, es->s, (const int32_t *)PyArray_DATA(tok), (int64_t)n,
                              (int32_t *)PyArray_DATA(o32));
    Py_END_ALLOW_THREADS
    if (eng_check("greedy", st) < 0) goto fail;
    res = PyArray_Cast(o32, NPY_INT64);
fail:
    Py_DECREF(tok);
    Py_XDECREF(o32);
    return res;
}

/* cuda_model_sample(model, state, logits0 (B, V) | None, tokens (B,) | None, n, temperature,
 *                   top_k, top_p, seed, step, row_streams=False) -> (B, n) int64 (see engine);
 * a row that met NaN / all -inf logits: FloatingPointError. */
static PyObject *py_cuda_model_sample(PyObject *self, PyObject *args) {
    PyObject *om, *os, *ol, *otok, *ok, *op, *oseed;
    long long n, step;
    double temperature;
    int row_streams = 0;
    if (!PyArg_ParseTuple(args, "OOOOLdOOOL|p", &om, &os, &ol, &otok, &n, &temperature, &ok, &op,
                          &oseed, &step, &row_streams))
        return NULL;
    EngModel *em = eng_model(om);
    EngState *es = em ? eng_state(os, em) : NULL;
    if (!es) return NULL;
    if (n < 0 || n > (1LL << 30)) return PyErr_Format(PyExc_ValueError, "sample: n must be in 0..2**30");
    bm_cuda_sampling sp;
    if (parse_sampling("sample", temperature, ok, op, oseed, step, &sp) < 0) return NULL;
    sp.row_streams = row_streams;
    PyObject *res = NULL;
    PyArrayObject *tok = NULL, *lg = NULL, *o32 = NULL;
    if ((ol == Py_None) == (otok == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "sample: give exactly one of logits0 and tokens");
        return NULL;
    }
    if (otok != Py_None && !(tok = eng_ids(otok, 1, em->V, "sample"))) return NULL;
    if (ol != Py_None) {
        lg = (PyArrayObject *)PyArray_FROMANY(ol, NPY_FLOAT32, 2, 2, NPY_ARRAY_CARRAY);
        if (!lg) goto fail;
        if (PyArray_DIM(lg, 0) != es->B || PyArray_DIM(lg, 1) != em->V) {
            PyErr_Format(PyExc_ValueError, "sample: logits0 must have shape (B=%lld, V=%lld)",
                         (long long)es->B, (long long)em->V);
            goto fail;
        }
    }
    if (tok && PyArray_DIM(tok, 0) != es->B) {
        PyErr_Format(PyExc_ValueError, "sample: the state holds %lld rows, tokens has %lld",
                     (long long)es->B, (long long)PyArray_DIM(tok, 0));
        goto fail;
    }
    npy_intp dims[2] = {(npy_intp)es->B, (npy_intp)n};
    if (!(o32 = (PyArrayObject *)PyArray_ZEROS(2, dims, NPY_INT32, 0))) goto fail;
    int32_t *status = PyMem_Calloc((size_t)es->B, sizeof(int32_t));
    if (!status) {
        PyErr_NoMemory();
        goto fail;
    }
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_model_sample(em->m, es->s, lg ? (const float *)PyArray_DATA(lg) : NULL,
                              tok ? (const int32_t *)PyArray_DATA(tok) : NULL, (int64_t)n, &sp,
                              (int32_t *)PyArray_DATA(o32), status);
    Py_END_ALLOW_THREADS
    if (eng_check("sample", st) == 0 && sample_status_check("sample", status, es->B) == 0)
        res = PyArray_Cast(o32, NPY_INT64);
    PyMem_Free(status);
fail:
    Py_XDECREF(tok);
    Py_XDECREF(lg);
    Py_XDECREF(o32);
    return res;
}

static PyObject *py_cuda_model_info(PyObject *self, PyObject *om) {
    EngModel *em = eng_model(om);
    if (!em) return NULL;
    size_t wb = 0, wsb = 0;
    int graphs = 0;
    bm_cuda_model_bytes(em->m, &wb, &wsb, &graphs);
    return Py_BuildValue("{s:n,s:n,s:i,s:L}", "weight_bytes", (Py_ssize_t)wb, "workspace_bytes",
                         (Py_ssize_t)wsb, "graphs", graphs, "l2_set_aside", bm_cuda_l2_set_aside());
}

/* cuda_state_new(model, B) -> state capsule (zeros) */
static PyObject *py_cuda_state_new(PyObject *self, PyObject *args) {
    PyObject *om;
    long long B;
    if (!PyArg_ParseTuple(args, "OL", &om, &B)) return NULL;
    EngModel *em = eng_model(om);
    if (!em) return NULL;
    if (B < 1) return PyErr_Format(PyExc_ValueError, "batch_size must be a positive integer, got %lld", B);
    bm_cuda_state *s = NULL;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_state_create(em->m, (int64_t)B, &s);
    Py_END_ALLOW_THREADS
    if (eng_check("new_state", st) < 0) return NULL;
    return eng_wrap_state(s, em);
}

/* cuda_state_copy(model, state, rows=None) -> new state capsule (rows: int sequence) */
static PyObject *py_cuda_state_copy(PyObject *self, PyObject *args) {
    PyObject *om, *os, *orows = Py_None;
    if (!PyArg_ParseTuple(args, "OO|O", &om, &os, &orows)) return NULL;
    EngModel *em = eng_model(om);
    EngState *es = em ? eng_state(os, em) : NULL;
    if (!es) return NULL;
    PyArrayObject *rows = NULL;
    if (orows != Py_None) {
        rows = (PyArrayObject *)PyArray_FROMANY(orows, NPY_INT64, 1, 1, NPY_ARRAY_IN_ARRAY);
        if (!rows) return NULL;
        const int64_t *r = (const int64_t *)PyArray_DATA(rows);
        npy_intp n = PyArray_SIZE(rows);
        for (npy_intp i = 0; i < (n ? n : 1); i++) {  /* n = 0 is an error too */
            if (n == 0 || r[i] < 0 || r[i] >= es->B) {
                PyErr_Format(PyExc_IndexError, "rows outside a batch of %lld (or empty)", (long long)es->B);
                Py_DECREF(rows);
                return NULL;
            }
        }
    }
    bm_cuda_state *s = NULL;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_state_copy(em->m, es->s, rows ? (const int64_t *)PyArray_DATA(rows) : NULL,
                            rows ? (int64_t)PyArray_SIZE(rows) : 0, &s);
    Py_END_ALLOW_THREADS
    Py_XDECREF(rows);
    if (eng_check("state copy", st) < 0) return NULL;
    return eng_wrap_state(s, em);
}

/* cuda_state_set_row(model, dst, i, src, j): row i of dst <- row j of src */
static PyObject *py_cuda_state_set_row(PyObject *self, PyObject *args) {
    PyObject *om, *od, *osrc;
    long long i, j;
    if (!PyArg_ParseTuple(args, "OOLOL", &om, &od, &i, &osrc, &j)) return NULL;
    EngModel *em = eng_model(om);
    EngState *ed = em ? eng_state(od, em) : NULL;
    EngState *esrc = ed ? eng_state(osrc, em) : NULL;
    if (!esrc) return NULL;
    if (i < 0 || i >= ed->B || j < 0 || j >= esrc->B)
        return PyErr_Format(PyExc_IndexError, "set_row: row %lld of %lld <- row %lld of %lld", i,
                            (long long)ed->B, j, (long long)esrc->B);
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_state_set_row(em->m, ed->s, (int64_t)i, esrc->s, (int64_t)j);
    Py_END_ALLOW_THREADS
    if (eng_check("set_row", st) < 0) return NULL;
    Py_RETURN_NONE;
}

/* cuda_state_io(model, state, layer, which 0 conv | 1 ssm, array=None): None -> a host copy
 * ((B, K-1, E) or (B, E, N) float32); an array -> uploaded (exact shape), returns None. */
static PyObject *py_cuda_state_io(PyObject *self, PyObject *args) {
    PyObject *om, *os, *oa = Py_None;
    long long layer;
    int which;
    if (!PyArg_ParseTuple(args, "OOLi|O", &om, &os, &layer, &which, &oa)) return NULL;
    EngModel *em = eng_model(om);
    EngState *es = em ? eng_state(os, em) : NULL;
    if (!es) return NULL;
    if (layer < 0 || layer >= em->L || !em->mamba[layer] || (which != 0 && which != 1))
        return PyErr_Format(PyExc_ValueError, "state io: layer %lld has no %s state", layer,
                            which ? "ssm" : "conv");
    npy_intp dims[3] = {(npy_intp)es->B, (npy_intp)(which ? em->E : em->K - 1),
                        (npy_intp)(which ? em->N : em->E)};
    PyArrayObject *a;
    if (oa == Py_None) {
        a = (PyArrayObject *)PyArray_EMPTY(3, dims, NPY_FLOAT32, 0);
    } else {
        a = (PyArrayObject *)PyArray_FROMANY(oa, NPY_FLOAT32, 3, 3, NPY_ARRAY_IN_ARRAY);
        if (a && !PyArray_CompareLists(PyArray_DIMS(a), dims, 3)) {
            PyErr_Format(PyExc_ValueError, "state io: layer %lld %s must have shape (%ld, %ld, %ld)",
                         layer, which ? "ssm" : "conv", (long)dims[0], (long)dims[1], (long)dims[2]);
            Py_DECREF(a);
            return NULL;
        }
    }
    if (!a) return NULL;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_state_io(em->m, es->s, (int64_t)layer, which, (float *)PyArray_DATA(a), oa != Py_None);
    Py_END_ALLOW_THREADS
    if (eng_check("state io", st) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    if (oa != Py_None) {
        Py_DECREF(a);
        Py_RETURN_NONE;
    }
    return (PyObject *)a;
}

static PyObject *py_cuda_device_count(PyObject *self, PyObject *noargs) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        n = 0;
    }
    return PyLong_FromLong(n);
}

/* cuda_bench_copy(bytes, iters) -> GB/s (read + write); cuda_bench_gemm(m, n, k, iters) ->
 * TFLOP/s; cuda_bench_step(model, state, warmup, iters) -> ms per replay (float32 array);
 * cuda_bench_prefill(model, ids (B, L), warmup, iters) -> ms per prefill (float32 array). */
static PyObject *py_cuda_bench_copy(PyObject *self, PyObject *args) {
    long long bytes;
    int iters;
    double gbps = 0;
    if (!PyArg_ParseTuple(args, "Li", &bytes, &iters)) return NULL;
    if (bytes < 1024) return PyErr_Format(PyExc_ValueError, "bench_copy: bytes >= 1024");
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_bench_copy((size_t)bytes, iters, &gbps);
    Py_END_ALLOW_THREADS
    if (eng_check("bench_copy", st) < 0) return NULL;
    return PyFloat_FromDouble(gbps);
}

static PyObject *py_cuda_bench_gemm(PyObject *self, PyObject *args) {
    long long m, n, k;
    int iters;
    double tf = 0;
    if (!PyArg_ParseTuple(args, "LLLi", &m, &n, &k, &iters)) return NULL;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_bench_gemm_bf16(m, n, k, iters, &tf);
    Py_END_ALLOW_THREADS
    if (eng_check("bench_gemm", st) < 0) return NULL;
    return PyFloat_FromDouble(tf);
}

static PyObject *py_cuda_bench_step(PyObject *self, PyObject *args) {
    PyObject *om, *os;
    int warmup, iters;
    if (!PyArg_ParseTuple(args, "OOii", &om, &os, &warmup, &iters)) return NULL;
    EngModel *em = eng_model(om);
    EngState *es = em ? eng_state(os, em) : NULL;
    if (!es) return NULL;
    if (iters < 1 || warmup < 0) return PyErr_Format(PyExc_ValueError, "bench_step: iters >= 1, warmup >= 0");
    npy_intp dims[1] = {iters};
    PyArrayObject *ms = (PyArrayObject *)PyArray_ZEROS(1, dims, NPY_FLOAT32, 0);
    if (!ms) return NULL;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_bench_step(em->m, es->s, warmup, iters, (float *)PyArray_DATA(ms));
    Py_END_ALLOW_THREADS
    if (eng_check("bench_step", st) < 0) {
        Py_DECREF(ms);
        return NULL;
    }
    return (PyObject *)ms;
}

static PyObject *py_cuda_bench_prefill(PyObject *self, PyObject *args) {
    PyObject *om, *oids;
    int warmup, iters;
    if (!PyArg_ParseTuple(args, "OOii", &om, &oids, &warmup, &iters)) return NULL;
    EngModel *em = eng_model(om);
    if (!em) return NULL;
    if (iters < 1 || warmup < 0) return PyErr_Format(PyExc_ValueError, "bench_prefill: iters >= 1, warmup >= 0");
    PyArrayObject *ids = eng_ids(oids, 2, em->V, "bench_prefill");
    if (!ids) return NULL;
    npy_intp dims[1] = {iters};
    PyArrayObject *ms = (PyArrayObject *)PyArray_ZEROS(1, dims, NPY_FLOAT32, 0);
    if (!ms) {
        Py_DECREF(ids);
        return NULL;
    }
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_bench_prefill(em->m, (const int32_t *)PyArray_DATA(ids), PyArray_DIM(ids, 0),
                               PyArray_DIM(ids, 1), warmup, iters, (float *)PyArray_DATA(ms));
    Py_END_ALLOW_THREADS
    Py_DECREF(ids);
    if (eng_check("bench_prefill", st) < 0) {
        Py_DECREF(ms);
        return NULL;
    }
    return (PyObject *)ms;
}

/* cuda_bench_profile(model, state, ids (B, L) | None, iters) -> {stage: ms} */
static PyObject *py_cuda_bench_profile(PyObject *self, PyObject *args) {
    PyObject *om, *os, *oids;
    int iters;
    if (!PyArg_ParseTuple(args, "OOOi", &om, &os, &oids, &iters)) return NULL;
    EngModel *em = eng_model(om);
    EngState *es = em ? eng_state(os, em) : NULL;
    if (!es) return NULL;
    if (iters < 2) return PyErr_Format(PyExc_ValueError, "bench_profile: iters >= 2");
    PyArrayObject *ids = NULL;
    if (oids != Py_None) {
        if (!(ids = eng_ids(oids, 2, em->V, "bench_profile"))) return NULL;
        if (PyArray_DIM(ids, 0) != es->B) {
            Py_DECREF(ids);
            return PyErr_Format(PyExc_ValueError, "bench_profile: ids rows != state rows");
        }
    }
    double ms[BM_CUDA_PROF_STAGES];
    static const char *names[BM_CUDA_PROF_STAGES] = {BM_CUDA_PROF_NAMES};
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bm_cuda_bench_profile(em->m, es->s, ids ? (const int32_t *)PyArray_DATA(ids) : NULL,
                               ids ? PyArray_DIM(ids, 1) : 0, iters, ms);
    Py_END_ALLOW_THREADS
    Py_XDECREF(ids);
    if (eng_check("bench_profile", st) < 0) return NULL;
    PyObject *d = PyDict_New();
    for (int k = 1; d && k < BM_CUDA_PROF_STAGES; k++) {
        PyObject *v = PyFloat_FromDouble(ms[k]);
        if (!v || PyDict_SetItemString(d, names[k], v) < 0) Py_CLEAR(d);
        Py_XDECREF(v);
    }
    return d;
}

static PyMethodDef engine_methods[] = {
    {"cuda_device_count", py_cuda_device_count, METH_NOARGS, "cuda_device_count() -> number of CUDA devices (0 without any)"},
    {"cuda_model_create", py_cuda_model_create, METH_VARARGS, "cuda_model_create(cfg dict, weights dict) -> model"},
    {"cuda_model_prefill", py_cuda_model_prefill, METH_VARARGS, "cuda_model_prefill(model, state, ids (B,L), logits 0|1|2, trace=False) -> (logits, trace)"},
    {"cuda_model_step", py_cuda_model_step, METH_VARARGS, "cuda_model_step(model, state, tokens (B,), graph=True, logits=True, argmax=False, trace=False) -> (logits, argmax, trace)"},
    {"cuda_model_greedy", py_cuda_model_greedy, METH_VARARGS, "cuda_model_greedy(model, state, tokens (B,), n) -> (B, n) int64"},
    {"cuda_model_sample", py_cuda_model_sample, METH_VARARGS, "cuda_model_sample(model, state, logits0 (B,V) | None, tokens (B,) | None, n, temperature, top_k, top_p, seed, step, row_streams=False) -> (B, n) int64"},
    {"cuda_model_info", py_cuda_model_info, METH_O, "cuda_model_info(model) -> dict of device bytes and graphs"},
    {"cuda_state_new", py_cuda_state_new, METH_VARARGS, "cuda_state_new(model, B) -> state (zeros)"},
    {"cuda_state_copy", py_cuda_state_copy, METH_VARARGS, "cuda_state_copy(model, state, rows=None) -> state"},
    {"cuda_state_set_row", py_cuda_state_set_row, METH_VARARGS, "cuda_state_set_row(model, dst, i, src, j)"},
    {"cuda_state_io", py_cuda_state_io, METH_VARARGS, "cuda_state_io(model, state, layer, which, array=None) -> array | None"},
    {"cuda_bench_copy", py_cuda_bench_copy, METH_VARARGS, "cuda_bench_copy(bytes, iters) -> GB/s (read + write)"},
    {"cuda_bench_gemm", py_cuda_bench_gemm, METH_VARARGS, "cuda_bench_gemm(m, n, k, iters) -> bf16 TFLOP/s"},
    {"cuda_bench_step", py_cuda_bench_step, METH_VARARGS, "cuda_bench_step(model, state, warmup, iters) -> ms per graph replay"},
    {"cuda_bench_profile", py_cuda_bench_profile, METH_VARARGS, "cuda_bench_profile(model, state, ids (B,L) | None, iters) -> {stage: ms}"},
    {"cuda_bench_prefill", py_cuda_bench_prefill, METH_VARARGS, "cuda_bench_prefill(model, ids (B,L), warmup, iters) -> ms per prefill"},
    {NULL, NULL, 0, NULL},
};
#else  /* built without CUDA: only the probe, which says there is no device */
static PyObject *py_cuda_device_count(PyObject *self, PyObject *noargs) { return PyLong_FromLong(0); }
static PyMethodDef engine_methods[] = {
    {"cuda_device_count", py_cuda_device_count, METH_NOARGS, "cuda_device_count() -> 0 (built without CUDA)"},
    {NULL, NULL, 0, NULL},
};
#endif  /* BM_WITH_CUDA: engine */

/* ---- module ---------------------------------------------------------------------------- */

#define KW(name, doc) {#name, (PyCFunction)(void (*)(void))py_##name, METH_VARARGS | METH_KEYWORDS, doc}

static PyMethodDef methods[] = {
    {"cpu_info", py_cpu_info, METH_NOARGS, "cpu_info() -> dict of run-time CPU features"},
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n): threads of the C core (OpenBLAS runs single-threaded inside them)"},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    KW(linear, "linear(x (..., K) f32, weight (N, K) f32|bf16-as-uint16, bias=None) -> (..., N)"),
    {"bf16_to_f32", py_bf16_to_f32, METH_O, "bf16_to_f32(a uint16) -> float32"},
    {"f32_to_bf16", py_f32_to_bf16, METH_O, "f32_to_bf16(a float32) -> uint16 (round to nearest even)"},
    KW(selective_scan, "selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, "
                       "delta_softplus=True, state=None) -> (y (b,L,E), final_state (b,E,N))"),
    KW(selective_state_update, "selective_state_update(state (b,E,N), x, delta, A, B, C, D=None, "
                               "z=None, delta_bias=None, delta_softplus=True) -> y (b,E); state updated in place"),
    KW(causal_conv1d, "causal_conv1d(x (b,L,E), weight (E,K), bias=None, conv_state=None (b,K-1,E), "
                      "activation='silu') -> (y, final_conv_state)"),
    KW(causal_conv1d_update, "causal_conv1d_update(x (b,E), conv_state (b,K-1,E), weight, bias=None, "
                             "activation='silu') -> y; conv_state updated in place"),
    KW(rms_norm, "rms_norm(x (...,d), weight, residual=None, eps=1e-5) -> (out, x + residual)"),
    KW(layer_norm, "layer_norm(x (...,d), weight, bias=None, residual=None, eps=1e-5) -> out"),
    KW(route_top1, "route_top1(x (...,d), router_weight (X,d), router_bias (X), return_logits=False) "
                   "-> (ids int32 (T,), gates (T,)[, logits (T,X)])"),
    KW(moe_dispatch, "moe_dispatch(ids (T,), num_experts) -> (counts (X,), offsets (X+1,), perm (T,))"),
    KW(moe_experts, "moe_experts(x (...,d), ids (T,), gates (T,)|None, fc1 (X,2F,d), fc2 (X,d,F), "
                    "activation='gelu') -> out"),
    KW(moe, "moe(x (...,d), router_weight, router_bias, fc1 (X,2F,d), fc2 (X,d,F), activation='gelu', "
            "return_routing=False) -> out | (out, ids, gates, logits)"),
    KW(mlp, "mlp(x (...,d), fc1 (2F,d) or (F,d), fc2 (d,F), activation='gelu', gated=True) -> out"),
    KW(sinkhorn, "sinkhorn(logits (T,X), tol=1e-4, init='blackmamba'|'uniform', max_iters=1000) "
                 "-> (P (T,X), iterations)"),
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "blackmamba._C",
                                       "blackmamba C core (CPU kernels; CUDA where built)", -1,
                                       methods};

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    PyObject *m = PyModule_Create(&moduledef);
#ifdef BM_WITH_CUDA
    if (m && cuda_module_init(m) < 0) Py_CLEAR(m);
#endif
    if (m && PyModule_AddFunctions(m, engine_methods) < 0) Py_CLEAR(m);
    return m;
}
