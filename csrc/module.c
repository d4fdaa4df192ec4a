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
    return PyModule_Create(&moduledef);
}
