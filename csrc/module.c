/* module.c: blackmamba._C, the one file that touches Python.h.
 *
 * Each binding: parse arguments, validate every array at the boundary (dtype, ndim, exact
 * shape by dimension letter, contiguity), allocate outputs, release the GIL around the C
 * core call, map its status to a Python exception. Inputs that are not C-contiguous are
 * copied; arrays updated in place must already be C-contiguous and writeable.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>

#include <string.h>

#include "bm.h"

/* ---- argument validation ------------------------------------------------------------- */

#define SIG_MAX_OWNED 24

/* A call's signature state: dimension letters bound so far, arrays this call owns. */
typedef struct {
    const char *fn;
    int64_t dim[128];             /* dim['E'] = bound size of letter E, -1 while unbound */
    PyObject *owned[SIG_MAX_OWNED];
    int nowned;
} Sig;

enum { ARG_REQUIRED = 0, ARG_OPTIONAL = 1, ARG_INPLACE = 2 };
/* dtype class for sig_arr: a NumPy typenum, or WEIGHT = float32 or uint16 (bf16 bits). */
#define DT_WEIGHT (-1)
#define DT_INT (-2) /* any integer array, converted to int32 after a range check by caller */

static void sig_init(Sig *s, const char *fn) {
    s->fn = fn;
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

/* Check `a`'s shape against `shape` ("bLE"; a leading "..." allows any leading dims whose
 * product binds letter 'T'), binding unbound letters. */
static int sig_check_shape(Sig *s, PyArrayObject *a, const char *name, const char *shape) {
    int nd = PyArray_NDIM(a);
    const npy_intp *dims = PyArray_DIMS(a);
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

/* Validate argument `obj` named `name`. Returns a C-contiguous aligned array owned by `s`,
 * or NULL: with an exception set on error, without one for an absent optional argument. */
static PyArrayObject *sig_arr(Sig *s, PyObject *obj, const char *name, int dtype,
                              const char *shape, int flags) {
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
    PyArrayObject *a = (PyArrayObject *)obj;
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

/* New zeroed array of `shape` letters (all bound), optionally with leading dims of `like`. */
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

#define F32(a) ((a) ? (float *)PyArray_DATA(a) : NULL)
#define DATA(a) ((a) ? PyArray_DATA(a) : NULL)
#define WDT(a) (PyArray_TYPE(a) == NPY_UINT16 ? BM_BF16 : BM_F32)
#define CALL(stmt)                                                                          \
    do {                                                                                    \
        bm_status st_;                                                                      \
        Py_BEGIN_ALLOW_THREADS st_ = (stmt);                                                \
        Py_END_ALLOW_THREADS if (check_status(&s, st_) < 0) goto fail;                      \
    } while (0)
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

/* Integer ids -> int32 array owned by s, each in [0, X). */
static PyArrayObject *ids_int32(Sig *s, PyArrayObject *ids, int64_t X, const char *name) {
    PyArrayObject *c = (PyArrayObject *)sig_own(
        s, PyArray_FROMANY((PyObject *)ids, NPY_INT64, 0, 0, NPY_ARRAY_C_CONTIGUOUS));
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
    return out;
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
    return Py_BuildValue("{s:O,s:O,s:i,s:O}", "avx512", bm_cpu_has_avx512() ? Py_True : Py_False,
                         "avx512bf16", bm_cpu_has_avx512bf16() ? Py_True : Py_False,
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

/* ---- gemm.c ---------------------------------------------------------------------------- */

static PyObject *py_linear(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"x", "weight", "bias", NULL};
    PyObject *ox, *ow, *ob = Py_None, *res = NULL;
    Sig s;
    sig_init(&s, "linear");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O", kws, &ox, &ow, &ob)) return NULL;
    PyArrayObject *x, *w, *b, *y;
    NEED(x = sig_arr(&s, ox, "x", NPY_FLOAT32, "...K", 0));
    NEED(w = sig_arr(&s, ow, "weight", DT_WEIGHT, "NK", 0));
    OPT(b = sig_arr(&s, ob, "bias", NPY_FLOAT32, "N", ARG_OPTIONAL));
    if (check_blas_dims(&s, s.dim['T'], s.dim['N'], s.dim['K']) < 0) goto fail;
    NEED(y = sig_new_like(&s, x, (npy_intp)s.dim['N'], NPY_FLOAT32));
    CALL(bm_linear(F32(x), DATA(w), WDT(w), F32(b), F32(y), s.dim['T'], s.dim['N'], s.dim['K']));
    res = ret(&s, (PyObject *)y);
fail:
    sig_free(&s);
    return res;
}

static PyObject *py_bf16_to_f32(PyObject *self, PyObject *arg) {
    Sig s;
    PyObject *res = NULL;
    sig_init(&s, "bf16_to_f32");
    PyArrayObject *a, *o;
    if (PyArray_Check(arg) && PyArray_NDIM((PyArrayObject *)arg) == 0) {
        PyErr_SetString(PyExc_ValueError, "bf16_to_f32: a must have at least one dimension");
        return NULL;
    }
    NEED(a = sig_arr(&s, arg, "a", NPY_UINT16, "...n", 0));
    NEED(o = sig_new_like(&s, a, (npy_intp)s.dim['n'], NPY_FLOAT32));
    Py_BEGIN_ALLOW_THREADS
    bm_bf16_to_f32((const uint16_t *)PyArray_DATA(a), F32(o), PyArray_SIZE(a));
    Py_END_ALLOW_THREADS
    res = ret(&s, (PyObject *)o);
fail:
    sig_free(&s);
    return res;
}

static PyObject *py_f32_to_bf16(PyObject *self, PyObject *arg) {
    Sig s;
    PyObject *res = NULL;
    sig_init(&s, "f32_to_bf16");
    PyArrayObject *a, *o;
    if (PyArray_Check(arg) && PyArray_NDIM((PyArrayObject *)arg) == 0) {
        PyErr_SetString(PyExc_ValueError, "f32_to_bf16: a must have at least one dimension");
        return NULL;
    }
    NEED(a = sig_arr(&s, arg, "a", NPY_FLOAT32, "...n", 0));
    NEED(o = sig_new_like(&s, a, (npy_intp)s.dim['n'], NPY_UINT16));
    Py_BEGIN_ALLOW_THREADS
    bm_f32_to_bf16(F32(a), (uint16_t *)PyArray_DATA(o), PyArray_SIZE(a));
    Py_END_ALLOW_THREADS
    res = ret(&s, (PyObject *)o);
fail:
    sig_free(&s);
    return res;
}

/* ---- scan.c ---------------------------------------------------------------------------- */

static PyObject *py_selective_scan(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                          "delta_softplus", "state", NULL};
    PyObject *ou, *odt, *oA, *oB, *oC, *oD = Py_None, *oz = Py_None, *odb = Py_None,
             *ost = Py_None, *res = NULL;
    int softplus = 1;
    Sig s;
    sig_init(&s, "selective_scan");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO|OOOpO", kws, &ou, &odt, &oA, &oB, &oC,
                                     &oD, &oz, &odb, &softplus, &ost))
        return NULL;
    PyArrayObject *u, *dt, *A, *B, *C, *D, *z, *db, *st, *y, *fin;
    NEED(u = sig_arr(&s, ou, "u", NPY_FLOAT32, "bLE", 0));
    NEED(dt = sig_arr(&s, odt, "delta", NPY_FLOAT32, "bLE", 0));
    NEED(A = sig_arr(&s, oA, "A", NPY_FLOAT32, "EN", 0));
    NEED(B = sig_arr(&s, oB, "B", NPY_FLOAT32, "bLN", 0));
    NEED(C = sig_arr(&s, oC, "C", NPY_FLOAT32, "bLN", 0));
    OPT(D = sig_arr(&s, oD, "D", NPY_FLOAT32, "E", ARG_OPTIONAL));
    OPT(z = sig_arr(&s, oz, "z", NPY_FLOAT32, "bLE", ARG_OPTIONAL));
    OPT(db = sig_arr(&s, odb, "delta_bias", NPY_FLOAT32, "E", ARG_OPTIONAL));
    OPT(st = sig_arr(&s, ost, "state", NPY_FLOAT32, "bEN", ARG_OPTIONAL));
    NEED(y = sig_new(&s, "bLE", NPY_FLOAT32));
    NEED(fin = sig_new(&s, "bEN", NPY_FLOAT32));
    CALL(bm_scan_forward(F32(u), F32(dt), F32(A), F32(B), F32(C), F32(D), F32(z), F32(db),
                         softplus, F32(st), F32(fin), F32(y), s.dim['b'], s.dim['L'],
                         s.dim['E'], s.dim['N']));
    res = Py_BuildValue("OO", y, fin);
fail:
    sig_free(&s);
    return res;
}

static PyObject *py_selective_state_update(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"state", "x", "delta", "A", "B", "C", "D", "z", "delta_bias",
                          "delta_softplus", NULL};
    PyObject *ost, *ox, *odt, *oA, *oB, *oC, *oD = Py_None, *oz = Py_None, *odb = Py_None,
             *res = NULL;
    int softplus = 1;
    Sig s;
    sig_init(&s, "selective_state_update");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOO|OOOp", kws, &ost, &ox, &odt, &oA, &oB,
                                     &oC, &oD, &oz, &odb, &softplus))
        return NULL;
    PyArrayObject *st, *x, *dt, *A, *B, *C, *D, *z, *db, *y;
    NEED(st = sig_arr(&s, ost, "state", NPY_FLOAT32, "bEN", ARG_INPLACE));
    NEED(x = sig_arr(&s, ox, "x", NPY_FLOAT32, "bE", 0));
    NEED(dt = sig_arr(&s, odt, "delta", NPY_FLOAT32, "bE", 0));
    NEED(A = sig_arr(&s, oA, "A", NPY_FLOAT32, "EN", 0));
    NEED(B = sig_arr(&s, oB, "B", NPY_FLOAT32, "bN", 0));
    NEED(C = sig_arr(&s, oC, "C", NPY_FLOAT32, "bN", 0));
    OPT(D = sig_arr(&s, oD, "D", NPY_FLOAT32, "E", ARG_OPTIONAL));
    OPT(z = sig_arr(&s, oz, "z", NPY_FLOAT32, "bE", ARG_OPTIONAL));
    OPT(db = sig_arr(&s, odb, "delta_bias", NPY_FLOAT32, "E", ARG_OPTIONAL));
    NEED(y = sig_new(&s, "bE", NPY_FLOAT32));
    CALL(bm_scan_step(F32(st), F32(x), F32(dt), F32(A), F32(B), F32(C), F32(D), F32(z), F32(db),
                      softplus, F32(y), s.dim['b'], s.dim['E'], s.dim['N']));
    res = ret(&s, (PyObject *)y);
fail:
    sig_free(&s);
    return res;
}

/* ---- conv.c ---------------------------------------------------------------------------- */

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

/* weight (E, K) or (E, 1, K) with K in 2..8 */
static PyArrayObject *conv_weight(Sig *s, PyObject *ow) {
    PyArrayObject *w = sig_arr(s, ow, "weight", NPY_FLOAT32,
                               PyArray_Check(ow) && PyArray_NDIM((PyArrayObject *)ow) == 3 ? "EoK" : "EK", 0);
    if (!w) return NULL;
    if (PyArray_NDIM(w) == 3 && s->dim['o'] != 1) {
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

static PyObject *py_causal_conv1d(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"x", "weight", "bias", "conv_state", "activation", NULL};
    PyObject *ox, *ow, *ob = Py_None, *ocs = Py_None, *oact = NULL, *res = NULL;
    Sig s;
    sig_init(&s, "causal_conv1d");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOO", kws, &ox, &ow, &ob, &ocs, &oact))
        return NULL;
    int silu = 1;
    if (oact && parse_silu(&s, oact, &silu) < 0) return NULL;
    PyArrayObject *x, *w, *b, *cs, *y, *fin;
    NEED(x = sig_arr(&s, ox, "x", NPY_FLOAT32, "bLE", 0));
    NEED(w = conv_weight(&s, ow));
    OPT(b = sig_arr(&s, ob, "bias", NPY_FLOAT32, "E", ARG_OPTIONAL));
    OPT(cs = sig_arr(&s, ocs, "conv_state", NPY_FLOAT32, "bkE", ARG_OPTIONAL));
    NEED(y = sig_new(&s, "bLE", NPY_FLOAT32));
    NEED(fin = sig_new(&s, "bkE", NPY_FLOAT32));
    CALL(bm_conv_forward(F32(x), F32(w), F32(b), F32(cs), F32(fin), F32(y), silu, s.dim['b'],
                         s.dim['L'], s.dim['E'], s.dim['K']));
    res = Py_BuildValue("OO", y, fin);
fail:
    sig_free(&s);
    return res;
}

static PyObject *py_causal_conv1d_update(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"x", "conv_state", "weight", "bias", "activation", NULL};
    PyObject *ox, *ocs, *ow, *ob = Py_None, *oact = NULL, *res = NULL;
    Sig s;
    sig_init(&s, "causal_conv1d_update");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|OO", kws, &ox, &ocs, &ow, &ob, &oact))
        return NULL;
    int silu = 1;
    if (oact && parse_silu(&s, oact, &silu) < 0) return NULL;
    PyArrayObject *x, *w, *b, *cs, *y;
    NEED(x = sig_arr(&s, ox, "x", NPY_FLOAT32, "bE", 0));
    NEED(w = conv_weight(&s, ow));
    NEED(cs = sig_arr(&s, ocs, "conv_state", NPY_FLOAT32, "bkE", ARG_INPLACE));
    OPT(b = sig_arr(&s, ob, "bias", NPY_FLOAT32, "E", ARG_OPTIONAL));
    NEED(y = sig_new(&s, "bE", NPY_FLOAT32));
    CALL(bm_conv_step(F32(x), F32(cs), F32(w), F32(b), F32(y), silu, s.dim['b'], s.dim['E'],
                      s.dim['K']));
    res = ret(&s, (PyObject *)y);
fail:
    sig_free(&s);
    return res;
}

/* ---- norm.c ---------------------------------------------------------------------------- */

/* "...d" alone lets (3, 2, d) stand for (2, 3, d): the residual must match x exactly. */
static int same_shape(PyArrayObject *a, PyArrayObject *b) {
    return PyArray_NDIM(a) == PyArray_NDIM(b) &&
           PyArray_CompareLists(PyArray_DIMS(a), PyArray_DIMS(b), PyArray_NDIM(a));
}

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

static PyObject *py_rms_norm(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"x", "weight", "residual", "eps", NULL};
    PyObject *ox, *ow, *or = Py_None, *res = NULL;
    double eps = 1e-5;
    Sig s;
    sig_init(&s, "rms_norm");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|Od", kws, &ox, &ow, &or, &eps)) return NULL;
    if (parse_eps(&s, eps) < 0) return NULL;
    PyArrayObject *x, *w, *r, *out, *rout;
    NEED(x = sig_arr(&s, ox, "x", NPY_FLOAT32, "...d", 0));
    NEED(w = sig_arr(&s, ow, "weight", NPY_FLOAT32, "d", 0));
    OPT(r = sig_arr(&s, or, "residual", NPY_FLOAT32, "...d", ARG_OPTIONAL));
    if (r && !same_shape(r, x)) {
        char got[256], want[256];
        shape_str(got, sizeof(got), PyArray_NDIM(r), PyArray_DIMS(r));
        shape_str(want, sizeof(want), PyArray_NDIM(x), PyArray_DIMS(x));
        PyErr_Format(PyExc_ValueError, "rms_norm: residual must have the shape of x %s, got %s",
                     want, got);
        goto fail;
    }
    NEED(out = sig_new_like(&s, x, (npy_intp)s.dim['d'], NPY_FLOAT32));
    NEED(rout = sig_new_like(&s, x, (npy_intp)s.dim['d'], NPY_FLOAT32));
    CALL(bm_rms_norm(F32(x), F32(r), F32(w), (float)eps, F32(out), F32(rout), s.dim['T'],
                     s.dim['d']));
    res = Py_BuildValue("OO", out, rout);
fail:
    sig_free(&s);
    return res;
}

static PyObject *py_layer_norm(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"x", "weight", "bias", "residual", "eps", NULL};
    PyObject *ox, *ow, *ob = Py_None, *or = Py_None, *res = NULL;
    double eps = 1e-5;
    Sig s;
    sig_init(&s, "layer_norm");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOd", kws, &ox, &ow, &ob, &or, &eps))
        return NULL;
    if (parse_eps(&s, eps) < 0) return NULL;
    PyArrayObject *x, *w, *b, *r, *out;
    NEED(x = sig_arr(&s, ox, "x", NPY_FLOAT32, "...d", 0));
    NEED(w = sig_arr(&s, ow, "weight", NPY_FLOAT32, "d", 0));
    OPT(b = sig_arr(&s, ob, "bias", NPY_FLOAT32, "d", ARG_OPTIONAL));
    OPT(r = sig_arr(&s, or, "residual", NPY_FLOAT32, "...d", ARG_OPTIONAL));
    if (r && !same_shape(r, x)) {
        char got[256], want[256];
        shape_str(got, sizeof(got), PyArray_NDIM(r), PyArray_DIMS(r));
        shape_str(want, sizeof(want), PyArray_NDIM(x), PyArray_DIMS(x));
        PyErr_Format(PyExc_ValueError, "layer_norm: residual must have the shape of x %s, got %s",
                     want, got);
        goto fail;
    }
    NEED(out = sig_new_like(&s, x, (npy_intp)s.dim['d'], NPY_FLOAT32));
    CALL(bm_layer_norm(F32(x), F32(r), F32(w), F32(b), (float)eps, F32(out), s.dim['T'],
                       s.dim['d']));
    res = ret(&s, (PyObject *)out);
fail:
    sig_free(&s);
    return res;
}

/* ---- moe.c ----------------------------------------------------------------------------- */

static PyObject *py_route_top1(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"x", "router_weight", "router_bias", "return_logits", NULL};
    PyObject *ox, *ow, *ob, *res = NULL;
    int want_logits = 0;
    Sig s;
    sig_init(&s, "route_top1");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|p", kws, &ox, &ow, &ob, &want_logits))
        return NULL;
    PyArrayObject *x, *w, *b, *ids, *gates, *logits;
    NEED(x = sig_arr(&s, ox, "x", NPY_FLOAT32, "...d", 0));
    NEED(w = sig_arr(&s, ow, "router_weight", NPY_FLOAT32, "Xd", 0));
    NEED(b = sig_arr(&s, ob, "router_bias", NPY_FLOAT32, "X", 0));
    if (s.dim['X'] < 1) {
        PyErr_SetString(PyExc_ValueError, "route_top1: need at least one expert");
        goto fail;
    }
    NEED(ids = sig_new(&s, "T", NPY_INT32));
    NEED(gates = sig_new(&s, "T", NPY_FLOAT32));
    NEED(logits = sig_new(&s, "TX", NPY_FLOAT32));
    CALL(bm_route_top1(F32(x), F32(w), F32(b), F32(logits), (int32_t *)PyArray_DATA(ids),
                       F32(gates), s.dim['T'], s.dim['d'], s.dim['X']));
    res = want_logits ? Py_BuildValue("OOO", ids, gates, logits) : Py_BuildValue("OO", ids, gates);
fail:
    sig_free(&s);
    return res;
}

static PyObject *py_moe_dispatch(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"ids", "num_experts", NULL};
    PyObject *oids, *res = NULL;
    Py_ssize_t X;
    Sig s;
    sig_init(&s, "moe_dispatch");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "On", kws, &oids, &X)) return NULL;
    if (X < 1 || X > 1 << 20)
        return PyErr_Format(PyExc_ValueError, "moe_dispatch: num_experts must be in 1..2**20");
    PyArrayObject *ids, *ids32, *counts, *offsets, *perm;
    NEED(ids = sig_arr(&s, oids, "ids", DT_INT, "T", 0));
    s.dim['X'] = X;
    NEED(ids32 = ids_int32(&s, ids, X, "ids"));
    NEED(counts = sig_new(&s, "X", NPY_INT64));
    NEED(offsets = sig_new(&s, "X+", NPY_INT64));
    NEED(perm = sig_new(&s, "T", NPY_INT64));
    CALL(bm_moe_dispatch((const int32_t *)PyArray_DATA(ids32), s.dim['T'], X,
                         (int64_t *)PyArray_DATA(counts), (int64_t *)PyArray_DATA(offsets),
                         (int64_t *)PyArray_DATA(perm)));
    res = Py_BuildValue("OOO", counts, offsets, perm);
fail:
    sig_free(&s);
    return res;
}

/* fc1 (X, 2F, d) and fc2 (X, d, F) of one dtype; binds X, F (from 2F) and checks d. */
static int expert_weights(Sig *s, PyObject *o1, PyObject *o2, PyArrayObject **fc1,
                          PyArrayObject **fc2) {
    if (!(*fc1 = sig_arr(s, o1, "fc1", DT_WEIGHT, "XGd", 0))) return -1;
    if (s->dim['G'] % 2) {
        PyErr_Format(PyExc_ValueError, "%s: fc1 must have shape (X, 2F, d): its middle "
                     "dimension %ld is odd", s->fn, (long)s->dim['G']);
        return -1;
    }
    s->dim['F'] = s->dim['G'] / 2;
    if (!(*fc2 = sig_arr(s, o2, "fc2", DT_WEIGHT, "XdF", 0))) return -1;
    if (PyArray_TYPE(*fc1) != PyArray_TYPE(*fc2)) {
        PyErr_Format(PyExc_TypeError, "%s: fc1 and fc2 must have the same dtype", s->fn);
        return -1;
    }
    return check_blas_dims(s, s->dim['T'], s->dim['G'], s->dim['d']);
}

static PyObject *py_moe_experts(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"x", "ids", "gates", "fc1", "fc2", "activation", NULL};
    PyObject *ox, *oids, *og, *o1, *o2, *oact = NULL, *res = NULL;
    Sig s;
    sig_init(&s, "moe_experts");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO|O", kws, &ox, &oids, &og, &o1, &o2, &oact))
        return NULL;
    bm_act act = BM_ACT_GELU;
    if (oact && parse_act(s.fn, oact, &act, 0) < 0) return NULL;
    PyArrayObject *x, *ids, *ids32, *g, *fc1, *fc2, *out;
    NEED(x = sig_arr(&s, ox, "x", NPY_FLOAT32, "...d", 0));
    NEED(ids = sig_arr(&s, oids, "ids", DT_INT, "T", 0));
    OPT(g = sig_arr(&s, og, "gates", NPY_FLOAT32, "T", ARG_OPTIONAL));
    if (expert_weights(&s, o1, o2, &fc1, &fc2) < 0) goto fail;
    NEED(ids32 = ids_int32(&s, ids, s.dim['X'], "ids"));
    NEED(out = sig_new_like(&s, x, (npy_intp)s.dim['d'], NPY_FLOAT32));
    CALL(bm_moe_experts(F32(x), (const int32_t *)PyArray_DATA(ids32), F32(g), DATA(fc1),
                        DATA(fc2), WDT(fc1), act, F32(out), s.dim['T'], s.dim['d'], s.dim['X'],
                        s.dim['F']));
    res = ret(&s, (PyObject *)out);
fail:
    sig_free(&s);
    return res;
}

static PyObject *py_moe(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"x", "router_weight", "router_bias", "fc1", "fc2", "activation",
                          "return_routing", NULL};
    PyObject *ox, *ow, *ob, *o1, *o2, *oact = NULL, *res = NULL;
    int routing = 0;
    Sig s;
    sig_init(&s, "moe");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO|Op", kws, &ox, &ow, &ob, &o1, &o2, &oact,
                                     &routing))
        return NULL;
    bm_act act = BM_ACT_GELU;
    if (oact && parse_act(s.fn, oact, &act, 0) < 0) return NULL;
    PyArrayObject *x, *w, *b, *fc1, *fc2, *ids, *gates, *logits, *out;
    NEED(x = sig_arr(&s, ox, "x", NPY_FLOAT32, "...d", 0));
    NEED(w = sig_arr(&s, ow, "router_weight", NPY_FLOAT32, "Xd", 0));
    NEED(b = sig_arr(&s, ob, "router_bias", NPY_FLOAT32, "X", 0));
    if (expert_weights(&s, o1, o2, &fc1, &fc2) < 0) goto fail;
    NEED(ids = sig_new(&s, "T", NPY_INT32));
    NEED(gates = sig_new(&s, "T", NPY_FLOAT32));
    NEED(logits = sig_new(&s, "TX", NPY_FLOAT32));
    NEED(out = sig_new_like(&s, x, (npy_intp)s.dim['d'], NPY_FLOAT32));
    CALL(bm_route_top1(F32(x), F32(w), F32(b), F32(logits), (int32_t *)PyArray_DATA(ids),
                       F32(gates), s.dim['T'], s.dim['d'], s.dim['X']));
    CALL(bm_moe_experts(F32(x), (const int32_t *)PyArray_DATA(ids), F32(gates), DATA(fc1),
                        DATA(fc2), WDT(fc1), act, F32(out), s.dim['T'], s.dim['d'], s.dim['X'],
                        s.dim['F']));
    res = routing ? Py_BuildValue("OOOO", out, ids, gates, logits) : ret(&s, (PyObject *)out);
fail:
    sig_free(&s);
    return res;
}

static PyObject *py_mlp(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"x", "fc1", "fc2", "activation", "gated", NULL};
    PyObject *ox, *o1, *o2, *oact = NULL, *res = NULL;
    int gated = 1;
    Sig s;
    sig_init(&s, "mlp");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|Op", kws, &ox, &o1, &o2, &oact, &gated))
        return NULL;
    bm_act act = BM_ACT_GELU;
    if (oact && parse_act(s.fn, oact, &act, 1) < 0) return NULL;
    PyArrayObject *x, *fc1, *fc2, *out;
    NEED(x = sig_arr(&s, ox, "x", NPY_FLOAT32, "...d", 0));
    NEED(fc1 = sig_arr(&s, o1, "fc1", DT_WEIGHT, "Gd", 0));
    if (gated && s.dim['G'] % 2) {
        PyErr_Format(PyExc_ValueError, "mlp: gated fc1 must have shape (2F, d), got an odd "
                     "first dimension %ld", (long)s.dim['G']);
        goto fail;
    }
    s.dim['F'] = gated ? s.dim['G'] / 2 : s.dim['G'];
    NEED(fc2 = sig_arr(&s, o2, "fc2", DT_WEIGHT, "dF", 0));
    if (PyArray_TYPE(fc1) != PyArray_TYPE(fc2)) {
        PyErr_SetString(PyExc_TypeError, "mlp: fc1 and fc2 must have the same dtype");
        goto fail;
    }
    if (check_blas_dims(&s, s.dim['T'], s.dim['G'], s.dim['d']) < 0) goto fail;
    NEED(out = sig_new_like(&s, x, (npy_intp)s.dim['d'], NPY_FLOAT32));
    CALL(bm_mlp(F32(x), DATA(fc1), DATA(fc2), WDT(fc1), act, gated, F32(out), s.dim['T'],
                s.dim['d'], s.dim['F']));
    res = ret(&s, (PyObject *)out);
fail:
    sig_free(&s);
    return res;
}

/* ---- sinkhorn.c ------------------------------------------------------------------------ */

static PyObject *py_sinkhorn(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"logits", "tol", "init", "max_iters", NULL};
    PyObject *ol, *res = NULL;
    double tol = 1e-4;
    const char *init = "blackmamba";
    int max_iters = 1000;
    Sig s;
    sig_init(&s, "sinkhorn");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|dsi", kws, &ol, &tol, &init, &max_iters))
        return NULL;
    bm_sinkhorn_init in;
    if (!strcmp(init, "blackmamba")) in = BM_SINKHORN_BLACKMAMBA;
    else if (!strcmp(init, "uniform")) in = BM_SINKHORN_UNIFORM;
    else return PyErr_Format(PyExc_ValueError, "sinkhorn: init must be 'blackmamba' or 'uniform', got '%s'", init);
    if (!(tol >= 0.0)) return PyErr_Format(PyExc_ValueError, "sinkhorn: tol must be >= 0");
    if (max_iters < 1) return PyErr_Format(PyExc_ValueError, "sinkhorn: max_iters must be >= 1");
    PyArrayObject *S, *P;
    NEED(S = sig_arr(&s, ol, "logits", NPY_FLOAT32, "TX", 0));
    if (s.dim['T'] < 1 || s.dim['X'] < 1) {
        PyErr_SetString(PyExc_ValueError, "sinkhorn: logits must have at least one row and column");
        goto fail;
    }
    NEED(P = sig_new(&s, "TX", NPY_FLOAT32));
    int iters = 0;
    CALL(bm_sinkhorn(F32(S), F32(P), s.dim['T'], s.dim['X'], (float)tol, in, max_iters, &iters));
    res = Py_BuildValue("Oi", P, iters);
fail:
    sig_free(&s);
    return res;
}

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

/* A host tensor from dict `d`[key]: float32 or uint16 (bf16 bits), `numel` elements, kept
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
    if (tn != NPY_FLOAT32 && tn != NPY_UINT16) {
        PyErr_Format(PyExc_TypeError, "cuda_model_create: %s %s must be float32 or uint16 "
                     "(bf16 bits)", where, key);
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
    t->dtype = tn == NPY_UINT16 ? BM_BF16 : BM_F32;
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
    else return PyErr_Format(PyExc_ValueError, "cuda_model_create: wdtype must be 'float32' or "
                             "'bfloat16' (the kernels have no fp16 path), got '%s'", wdt);
    if (!strcmp(math, "fp32")) c.math = BM_CUDA_MATH_FP32;
    else if (!strcmp(math, "tf32")) c.math = BM_CUDA_MATH_TF32;
    else if (!strcmp(math, "bf16")) c.math = BM_CUDA_MATH_BF16;
    else return PyErr_Format(PyExc_ValueError, "cuda_model_create: math must be 'fp32', 'tf32' "
                             "or 'bf16', got '%s'", math);

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

static PyObject *py_cuda_model_info(PyObject *self, PyObject *om) {
    EngModel *em = eng_model(om);
    if (!em) return NULL;
    size_t wb = 0, wsb = 0;
    int graphs = 0;
    bm_cuda_model_bytes(em->m, &wb, &wsb, &graphs);
    return Py_BuildValue("{s:n,s:n,s:i}", "weight_bytes", (Py_ssize_t)wb, "workspace_bytes",
                         (Py_ssize_t)wsb, "graphs", graphs);
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
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n): threads of the C core and OpenBLAS"},
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
    if (m && PyModule_AddFunctions(m, engine_methods) < 0) Py_CLEAR(m);
    return m;
}
