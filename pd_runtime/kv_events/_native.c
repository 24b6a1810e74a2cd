/* The prefix index's two hot loops in C: keying blocks and walking a prompt's keys.
 *
 * Why C: in Python each block costs ~0.3-0.4 us to key and ~0.4 us to walk (interpreter
 * dispatch, and a new int object for every 64-bit AND). A 64-endpoint decision walks ~100-300
 * blocks and ingestion keys every stored block, so these two loops set the floor of both the
 * decision latency and the ingestion rate (issue 11). The Python versions in keys.py and
 * index.py stay the reference: they define the results, these functions must reproduce them
 * exactly (tests/unit/test_native.py compares them on random inputs), and they are what runs
 * where this module was not built (pd_runtime/kv_events/native.py chooses).
 *
 * Every function returns None (or NotImplemented) where its fast path does not apply, rather
 * than raising, so that the caller falls back to the Python code and its error handling.
 *
 * Keys: CPython's numeric hash of an int and its tuple hash (Objects/longobject.c,
 * Objects/tupleobject.c, 64-bit builds: xxHash-style lanes), reproduced for tuples of ints so
 * that no tuple or int object is made per block. keys.py's docstring says why that hash.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if SIZEOF_VOID_P != 8
#error "the block keys are defined for 64-bit CPython builds only"
#endif

#define MODULUS ((uint64_t)0x1FFFFFFFFFFFFFFFULL) /* 2**61 - 1, CPython's _PyHASH_MODULUS */
#define XXPRIME_1 ((uint64_t)11400714785074694791ULL)
#define XXPRIME_2 ((uint64_t)14029467366897019727ULL)
#define XXPRIME_5 ((uint64_t)2870177450012600261ULL)
#define XXROTATE(x) (((x) << 31) | ((x) >> 33))

/* x mod (2**61 - 1) without a division: 2**61 == 1 modulo it, so fold the top 3 bits in. */
static inline uint64_t mod_p(uint64_t x) {
    uint64_t r = (x & MODULUS) + (x >> 61);
    return r >= MODULUS ? r - MODULUS : r;
}

/* hash(int) for an int in [-2**63, 2**64): |v| mod (2**61 - 1) with v's sign, -1 -> -2. */
static inline int64_t hash_signed(int64_t v) {
    if (v >= 0) return (int64_t)mod_p((uint64_t)v);
    int64_t h = -(int64_t)mod_p(0 - (uint64_t)v);
    return h == -1 ? -2 : h;
}

static inline int64_t hash_unsigned(uint64_t v) { return (int64_t)mod_p(v); }

/* The tuple hash's running state, one lane per item. */
static inline uint64_t lane(uint64_t acc, int64_t item_hash) {
    acc += (uint64_t)item_hash * XXPRIME_2;
    acc = XXROTATE(acc);
    return acc * XXPRIME_1;
}

static inline int64_t finish(uint64_t acc, uint64_t len) {
    acc += len ^ (XXPRIME_5 ^ 3527539ULL);
    return acc == (uint64_t)-1 ? 1546275796 : (int64_t)acc;
}

/* hash((parent, content)): the chaining step of keys.chain_keys. */
static inline int64_t chain(int64_t parent, int64_t content) {
    uint64_t acc = XXPRIME_5;
    acc = lane(acc, hash_signed(parent));
    acc = lane(acc, hash_signed(content));
    return finish(acc, 2);
}

/* ---- msgpack arrays of ints (BlockStored.token_ids as it arrives: msgspec.Raw) ---------------- */

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
} Reader;

static inline int need(Reader *r, Py_ssize_t n) { return r->end - r->p >= n; }

static inline uint64_t be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

/* The array header: its length, or -1 if the bytes do not start with an array. */
static Py_ssize_t read_array_header(Reader *r) {
    if (!need(r, 1)) return -1;
    unsigned char b = *r->p++;
    if ((b & 0xF0) == 0x90) return b & 0x0F;
    if (b == 0xDC && need(r, 2)) {
        r->p += 2;
        return (Py_ssize_t)be(r->p - 2, 2);
    }
    if (b == 0xDD && need(r, 4)) {
        r->p += 4;
        return (Py_ssize_t)be(r->p - 4, 4);
    }
    return -1;
}

/* One int's hash into *h; 0 if the next value is not an int (or the bytes end). */
static inline int read_int_hash(Reader *r, int64_t *h) {
    if (!need(r, 1)) return 0;
    unsigned char b = *r->p++;
    if (b <= 0x7F) {
        *h = b;
        return 1;
    }
    if (b >= 0xE0) {
        *h = (int64_t)(int8_t)b;  /* -32..-1: hash(-1) is -2 */
        if (*h == -1) *h = -2;
        return 1;
    }
    int n;
    int is_signed;
    switch (b) {
        case 0xCC: n = 1; is_signed = 0; break;
        case 0xCD: n = 2; is_signed = 0; break;
        case 0xCE: n = 4; is_signed = 0; break;
        case 0xCF: n = 8; is_signed = 0; break;
        case 0xD0: n = 1; is_signed = 1; break;
        case 0xD1: n = 2; is_signed = 1; break;
        case 0xD2: n = 4; is_signed = 1; break;
        case 0xD3: n = 8; is_signed = 1; break;
        default: return 0;
    }
    if (!need(r, n)) return 0;
    uint64_t v = be(r->p, n);
    r->p += n;
    if (!is_signed) {
        *h = hash_unsigned(v);
    } else {
        int shift = 64 - 8 * n; /* sign-extend an n-byte two's complement value */
        int64_t s = (int64_t)(v << shift) >> shift;
        *h = hash_signed(s);
    }
    return 1;
}

/* Keys of consecutive full blocks whose content hashes come from next_hash: the loop shared
 * by the msgpack and the sequence variants. Returns a new list or NULL with an exception. */
#define CHAIN_BLOCKS(N_BLOCKS, BLOCK_SIZE, PARENT, NEXT_HASH_STMT)                          \
    do {                                                                                   \
        out = PyList_New(N_BLOCKS);                                                        \
        if (out == NULL) goto done;                                                        \
        int64_t key = (PARENT);                                                            \
        for (Py_ssize_t blk = 0; blk < (N_BLOCKS); blk++) {                                \
            uint64_t acc = XXPRIME_5;                                                      \
            for (Py_ssize_t t = 0; t < (BLOCK_SIZE); t++) {                                \
                int64_t item = 0;                                                          \
                NEXT_HASH_STMT;                                                            \
                acc = lane(acc, item);                                                     \
            }                                                                              \
            key = chain(key, finish(acc, (uint64_t)(BLOCK_SIZE)));                         \
            PyObject *k = PyLong_FromLongLong(key);                                        \
            if (k == NULL) {                                                               \
                Py_CLEAR(out);                                                             \
                goto done;                                                                 \
            }                                                                              \
            PyList_SET_ITEM(out, blk, k);                                                  \
        }                                                                                  \
    } while (0)

static int parse_parent_and_size(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected,
                                 const char *name, int64_t *parent, Py_ssize_t *block_size) {
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, expected,
                     nargs);
        return -1;
    }
    *parent = PyLong_AsLongLong(args[0]);
    if (*parent == -1 && PyErr_Occurred()) return -1;
    *block_size = PyLong_AsSsize_t(args[2]);
    if (*block_size == -1 && PyErr_Occurred()) return -1;
    if (*block_size < 1) {
        PyErr_Format(PyExc_ValueError, "block_size must be >= 1, got %zd", *block_size);
        return -1;
    }
    return 0;
}

/* chain_keys_msgpack(parent, raw, block_size, n_blocks) -> list[int] | None:
 * keys.chain_keys(parent, decode(raw), block_size) without decoding. None if raw is not a
 * msgpack array of ints, or (n_blocks >= 0) not of exactly n_blocks * block_size of them: the
 * caller's Python path then names the error or handles the odd event. */
static PyObject *chain_keys_msgpack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t parent;
    Py_ssize_t bs;
    if (parse_parent_and_size(args, nargs, 4, "chain_keys_msgpack", &parent, &bs) < 0) {
        return NULL;
    }
    Py_ssize_t n_blocks = PyLong_AsSsize_t(args[3]);
    if (n_blocks == -1 && PyErr_Occurred()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *out = NULL;
    Reader r = {(const unsigned char *)view.buf, (const unsigned char *)view.buf + view.len};
    Py_ssize_t n = read_array_header(&r);
    if (n < 0 || n > r.end - r.p) goto none; /* an int takes at least a byte */
    if (n_blocks >= 0 && n != n_blocks * bs) goto none;
    /* One pass: key the full blocks, then check what follows them (a bad value anywhere is an
     * error, as it is for the Python decoder). */
    CHAIN_BLOCKS(n / bs, bs, parent, if (!read_int_hash(&r, &item)) goto bad);
    {
        int64_t h;
        for (Py_ssize_t i = (n / bs) * bs; i < n; i++) {
            if (!read_int_hash(&r, &h)) goto bad;
        }
    }
    if (r.p != r.end) goto bad;
done:
    PyBuffer_Release(&view);
    return out;
bad:
    Py_CLEAR(out);
none:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* chain_keys_ints(parent, token_ids, block_size) -> list[int] | None: keys.chain_keys without
 * extras for a list or tuple of ints; None for other sequences or an int beyond 64 bits. */
static PyObject *chain_keys_ints(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t parent;
    Py_ssize_t bs;
    if (parse_parent_and_size(args, nargs, 3, "chain_keys_ints", &parent, &bs) < 0) return NULL;
    PyObject *seq = args[1];
    if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)) Py_RETURN_NONE;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    /* Hash every token first: a non-int or a huge int sends the whole call back to Python. */
    int64_t *hashes = PyMem_Malloc(sizeof(int64_t) * (n ? n : 1));
    if (hashes == NULL) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = items[i];
        if (!PyLong_CheckExact(o)) goto none;
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow) goto none;
        hashes[i] = hash_signed(v);
    }
    PyObject *out = NULL;
    {
        const int64_t *next = hashes;
        CHAIN_BLOCKS(n / bs, bs, parent, item = *next++);
    }
done:
    PyMem_Free(hashes);
    return out;
none:
    PyMem_Free(hashes);
    Py_RETURN_NONE;
}

/* ---- the walk (index.leading_blocks for masks of <= 64 bits, no overlay) ---------------------- */

typedef struct {
    Py_ssize_t at;
    int bit;   /* 0..63 */
    int delta; /* +1 a span starts here, -1 one ends */
} SpanEdge;

static int edge_order(const void *a, const void *b) {
    Py_ssize_t x = ((const SpanEdge *)a)->at, y = ((const SpanEdge *)b)->at;
    return (x > y) - (x < y);
}

/* A Python int that is one power of two below 2**64, as its bit index; -1 otherwise. */
static int bit_index(PyObject *o) {
    if (!PyLong_Check(o)) return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    if (v == 0 || (v & (v - 1))) return -1;
    return __builtin_ctzll(v);
}

/* Record each endpoint of `bits` (ascending bit order, as the Python version) at `count`. */
static int record(PyObject *result, uint64_t bits, Py_ssize_t count, PyObject *endpoint_of_bit) {
    if (!bits) return 0;
    PyObject *n = PyLong_FromSsize_t(count);
    if (n == NULL) return -1;
    while (bits) {
        uint64_t low = bits & (0 - bits);
        bits ^= low;
        PyObject *b = PyLong_FromUnsignedLongLong(low);
        if (b == NULL) goto fail;
        PyObject *endpoint = PyDict_GetItemWithError(endpoint_of_bit, b);
        if (endpoint == NULL) {
            if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, b);
            Py_DECREF(b);
            goto fail;
        }
        Py_DECREF(b);
        if (PyDict_SetItem(result, endpoint, n) < 0) goto fail;
    }
    Py_DECREF(n);
    return 0;
fail:
    Py_DECREF(n);
    return -1;
}

/* leading_blocks(keys, masks, endpoint_of_bit, spans) -> dict | NotImplemented.
 * NotImplemented where the fast path does not apply (keys not a list or tuple, masks not a
 * dict, a mask or span bit beyond 64 bits): the caller runs the Python version. */
static PyObject *leading_blocks(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "leading_blocks() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *keys = args[0], *masks = args[1], *endpoint_of_bit = args[2], *spans = args[3];
    if (!(PyList_CheckExact(keys) || PyTuple_CheckExact(keys)) || !PyDict_Check(masks) ||
        !PyDict_Check(endpoint_of_bit)) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    SpanEdge *edges = NULL;
    Py_ssize_t n_edges = 0;
    if (spans != Py_None) {
        if (!PyList_CheckExact(spans) && !PyTuple_CheckExact(spans)) Py_RETURN_NOTIMPLEMENTED;
        Py_ssize_t n_spans = PySequence_Fast_GET_SIZE(spans);
        if (n_spans) {
            edges = PyMem_Malloc(sizeof(SpanEdge) * 2 * n_spans);
            if (edges == NULL) return PyErr_NoMemory();
        }
        PyObject **span_items = PySequence_Fast_ITEMS(spans);
        for (Py_ssize_t s = 0; s < n_spans; s++) {
            PyObject *span = span_items[s];
            if (!PyTuple_CheckExact(span) || PyTuple_GET_SIZE(span) != 3) goto not_implemented;
            Py_ssize_t start = PyLong_AsSsize_t(PyTuple_GET_ITEM(span, 0));
            Py_ssize_t end = PyLong_AsSsize_t(PyTuple_GET_ITEM(span, 1));
            if ((start == -1 || end == -1) && PyErr_Occurred()) {
                PyErr_Clear();
                goto not_implemented;
            }
            int bit = bit_index(PyTuple_GET_ITEM(span, 2));
            if (bit < 0) goto not_implemented;
            if (end > start) {
                edges[n_edges++] = (SpanEdge){start, bit, +1};
                edges[n_edges++] = (SpanEdge){end, bit, -1};
            }
        }
        if (n_edges > 1) qsort(edges, n_edges, sizeof(SpanEdge), edge_order);
    }

    PyObject *result = PyDict_New();
    if (result == NULL) goto error;
    PyObject **items = PySequence_Fast_ITEMS(keys);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    int live[64] = {0}; /* spans of each bit covering the current position */
    uint64_t pend = 0, alive = 0;
    Py_ssize_t e = 0, i = 0;
    for (i = 0; i < n; i++) {
        while (e < n_edges && edges[e].at <= i) { /* a span starting before 0: counted at 0 */
            int b = edges[e].bit;
            live[b] += edges[e].delta;
            if (live[b] > 0) {
                pend |= 1ULL << b;
            } else {
                pend &= ~(1ULL << b);
            }
            e++;
        }
        uint64_t here = pend;
        PyObject *mask = PyDict_GetItemWithError(masks, items[i]);
        if (mask != NULL) {
            unsigned long long m = PyLong_AsUnsignedLongLong(mask);
            if (m == (unsigned long long)-1 && PyErr_Occurred()) {
                PyErr_Clear(); /* wider than 64 bits (or not an int): the Python version */
                Py_DECREF(result);
                goto not_implemented;
            }
            here |= m;
        } else if (PyErr_Occurred()) { /* an unhashable key: let Python raise it */
            PyErr_Clear();
            Py_DECREF(result);
            goto not_implemented;
        }
        if (i == 0) {
            alive = here;
        } else if ((here & alive) != alive) {
            uint64_t gone = alive & ~here;
            alive &= here;
            if (record(result, gone, i, endpoint_of_bit) < 0) {
                Py_DECREF(result);
                goto error;
            }
        }
        if (!alive) break;
    }
    if (record(result, alive, i, endpoint_of_bit) < 0) {
        Py_DECREF(result);
        goto error;
    }
    PyMem_Free(edges);
    return result;
not_implemented:
    PyMem_Free(edges);
    Py_RETURN_NOTIMPLEMENTED;
error:
    PyMem_Free(edges);
    return NULL;
}

static PyMethodDef methods[] = {
    {"leading_blocks", (PyCFunction)(void (*)(void))leading_blocks, METH_FASTCALL,
     "index.leading_blocks for <= 64-bit masks without an overlay; NotImplemented otherwise."},
    {"chain_keys_msgpack", (PyCFunction)(void (*)(void))chain_keys_msgpack, METH_FASTCALL,
     "keys.chain_keys(parent, msgpack-decoded raw, block_size) without extras; None if raw is "
     "not a msgpack array of ints (of n_blocks * block_size ints, if n_blocks >= 0)."},
    {"chain_keys_ints", (PyCFunction)(void (*)(void))chain_keys_ints, METH_FASTCALL,
     "keys.chain_keys(parent, token_ids, block_size) without extras for a list or tuple of "
     "64-bit ints; None otherwise."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "pd_runtime.kv_events._native",
    .m_doc = "Compiled fast paths of the prefix index (see native.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
